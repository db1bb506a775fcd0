"""The staging directory the vLLM connector and the agent share: directives from any HTTP
client of vLLM become paths only when their ids are valid, and files appear whole."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from cwm_server.agent.engines.vllm import staging


def test_a_valid_directive_is_read_from_kv_transfer_params() -> None:
    op_id = staging.new_op_id()
    params = {"cwm": {"op": "load", "id": op_id}, "other": 1}
    assert staging.directive(params) == {"op": "load", "id": op_id}
    assert staging.directive({"cwm": {"op": "save", "id": op_id}}) == {"op": "save", "id": op_id}


@pytest.mark.parametrize(
    "params",
    [
        None,
        "cwm",
        {},
        {"cwm": "load"},
        {"cwm": {"op": "delete", "id": "0" * 32}},
        {"cwm": {"op": "load", "id": "../../../etc"}},
        {"cwm": {"op": "load", "id": "0" * 31}},
        {"cwm": {"op": "load", "id": "A" * 32}},
        {"cwm": {"op": "load", "id": "0" * 32 + "\n"}},
        {"cwm": {"op": "load", "id": 7}},
    ],
)
def test_anything_but_a_valid_directive_is_ignored(params: Any) -> None:
    assert staging.directive(params) is None


def test_an_invalid_id_never_becomes_a_path(tmp_path: Path) -> None:
    op_id = staging.new_op_id()
    assert staging.op_dir(tmp_path, staging.LOAD_DIR, op_id) == tmp_path / "load" / op_id
    for bad in ("../x", "", "0" * 32 + "/.."):
        with pytest.raises(ValueError, match="invalid staging id"):
            staging.op_dir(tmp_path, staging.LOAD_DIR, bad)


def test_session_files_are_named_by_a_digest_of_the_salt(tmp_path: Path) -> None:
    path = staging.session_path(tmp_path, "../../a salt/with\0odd chars")
    assert path.parent == tmp_path / staging.SESSIONS_DIR
    assert path.name.endswith(".json") and len(path.stem) == 40
    assert staging.session_path(tmp_path, "other") != path


def test_json_is_replaced_whole_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "load" / "x" / "result.json"
    staging.write_json_atomic(target, {"error": ""})
    staging.write_json_atomic(target, {"error": "boom"})
    assert staging.read_json(target) == {"error": "boom"}
    assert os.listdir(target.parent) == ["result.json"]
    target.write_text("{half")
    assert staging.read_json(target) is None
    assert staging.read_json(tmp_path / "missing.json") is None


def test_ensure_layout_makes_the_three_directories(tmp_path: Path) -> None:
    staging.ensure_layout(tmp_path)
    staging.ensure_layout(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["load", "save", "sessions"]
