"""`cwm show`: the window's token ids, which a thawed session's next prompt starts with, as
`--tokens` and in `--json`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cwm_client import WindowClient
from cwm_server.manager.config import ManagerConfig
from tests.helpers import FINGERPRINT, ROOT, ThreadedManager, synthetic_chunks, token_ids


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedManager]:
    root: Path = tmp_path_factory.mktemp("cli")
    running = ThreadedManager(
        ManagerConfig(data_dir=root / "data", listen="127.0.0.1:0", fsync=False)
    )
    with WindowClient(running.target) as client:
        client.freeze(
            "w", synthetic_chunks(300, seed=4), fingerprint=FINGERPRINT, token_ids=token_ids(300)
        )
    yield running
    running.stop()


def cwm(manager: ThreadedManager, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cwm_server.cli.main", *args, "--manager", manager.target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_show_tokens_prints_the_window_s_token_ids(manager: ThreadedManager) -> None:
    result = cwm(manager, "show", "w", "--tokens")
    assert result.returncode == 0, result.stderr
    assert [int(t) for t in result.stdout.split()] == token_ids(300)


def test_show_json_includes_the_token_ids(manager: ThreadedManager) -> None:
    result = cwm(manager, "show", "w", "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["token_ids"] == token_ids(300) and shown["tokens"] == 300


def test_ls_shows_when_each_window_expires(manager: ThreadedManager) -> None:
    with WindowClient(manager.target) as client:
        client.clone("w", "brief", ttl_seconds=3600)
    result = cwm(manager, "ls")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split()[-2:] == ["EXPIRES", "(UTC)"]
    by_name = {row.split()[0]: row for row in rows}
    assert by_name["w"].rstrip().endswith("never")
    assert not by_name["brief"].rstrip().endswith("never")


def test_a_missing_config_file_is_warned_about_once(
    manager: ThreadedManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CWM_CONFIG", str(tmp_path / "absent.toml"))
    result = cwm(manager, "ls")
    assert result.returncode == 0
    assert result.stderr.count("ignoring the config file") == 1
