"""The staging directory shared by the cwm vLLM connector and the agent beside it.

The connector runs inside vLLM (its scheduler process and its worker process); the agent is a
separate process on the same host. They meet in one local directory, configured on both
sides (`kv_connector_extra_config.cwm_dir` and `cwm agent --vllm-dir`), laid out as:

    engine.json                 written by the worker at start: model, KV shape, dtype, ISA
    sessions/<key>.json         one per cache_salt: the token ids of its last finished request
    load/<id>/manifest.json     a staged window (agent), with chunk-NNNNN.bin beside it
    load/<id>/scheduler.json    what the scheduler claimed for it, or why it refused
    load/<id>/result.json       what the worker loaded, or why it failed
    save/<id>/request.json      a save the agent asked for (the connector only saves these)
    save/<id>/result.json       the worker's canonical chunks and their digests, or an error

Every file is written to a temporary name and renamed, so a reader never sees half of one;
ids are 32 lowercase hex digits, checked before they become paths, because directives arrive
in `kv_transfer_params`, which any HTTP client of vLLM can send.

Directives travel in `kv_transfer_params` as `{"cwm": {"op": "save"|"load", "id": ID}}`.

Standard library only: both the connector (inside vLLM) and the agent import it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

DIRECTIVE_KEY = "cwm"
ENGINE_FILE = "engine.json"
SESSIONS_DIR = "sessions"
LOAD_DIR = "load"
SAVE_DIR = "save"
MANIFEST_FILE = "manifest.json"
SCHEDULER_FILE = "scheduler.json"
RESULT_FILE = "result.json"
REQUEST_FILE = "request.json"
STAGING_VERSION = 1

OP_ID_RE = re.compile(r"\A[0-9a-f]{32}\Z")


def new_op_id() -> str:
    return uuid.uuid4().hex


def valid_op_id(value: Any) -> bool:
    return isinstance(value, str) and OP_ID_RE.match(value) is not None


def chunk_file_name(index: int) -> str:
    return f"chunk-{index:05d}.bin"


def session_key(cache_salt: str) -> str:
    """A file name for a salt: salts may hold characters no file name should."""
    import hashlib

    return hashlib.sha256(cache_salt.encode("utf-8")).hexdigest()[:40]


def session_path(root: Path, cache_salt: str) -> Path:
    return root / SESSIONS_DIR / f"{session_key(cache_salt)}.json"


def op_dir(root: Path, kind: str, op_id: str) -> Path:
    if not valid_op_id(op_id):
        raise ValueError(f"invalid staging id {op_id!r}")
    return root / kind / op_id


def ensure_layout(root: Path) -> None:
    for name in (SESSIONS_DIR, LOAD_DIR, SAVE_DIR):
        (root / name).mkdir(parents=True, exist_ok=True)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to `path` through a temporary sibling and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, separators=(",", ":"))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes_atomic(path: Path, data: bytes | memoryview) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def read_json(path: Path) -> Any | None:
    """The JSON in `path`, or None when it does not exist or is not JSON."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def directive(kv_transfer_params: Any) -> dict[str, Any] | None:
    """The cwm directive in a request's kv_transfer_params, if it carries a valid one."""
    if not isinstance(kv_transfer_params, dict):
        return None
    value = kv_transfer_params.get(DIRECTIVE_KEY)
    if not isinstance(value, dict):
        return None
    if value.get("op") not in ("save", "load") or not valid_op_id(value.get("id")):
        return None
    return value


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
