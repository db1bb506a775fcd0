"""The staging directory shared by the cwm vLLM connector and the agent beside it.

The connector runs inside vLLM (its scheduler process and its worker process); the agent is a
separate process on the same host. They meet in one local directory, configured on both
sides (`kv_connector_extra_config.cwm_dir` and `cwm agent --vllm-dir`), laid out as:

    engine.json                 written by the worker at start: model, KV shape, dtype, ISA
    sessions/<key>.json         one per cache_salt: the token ids of its last finished request
    load/<id>/manifest.json     a staged window (agent), with chunk-NNNNN.bin beside it
    load/<id>/scheduler.json    what the scheduler claimed for it, or why it refused
    load/<id>/result.json       what the worker loaded, or why it failed
    load/<id>/keep.json         a thawed window kept for its session's first request (agent):
                                salt and expiry; from then on the connector owns the staging
    load/<id>/first-use/        that first request's claim (scheduler.json) and, if it had to
                                re-load the window, the worker's result.json
    save/<id>/request.json      a save the agent asked for (the connector only saves these)
    save/<id>/result.json       the worker's canonical chunks and their digests, or an error

Under tensor parallelism every worker rank writes its own outcome: rank 0 `result.json`,
rank r `result.rank<r>.json` (`result_path`); `engine.json` says how many ranks there are.

The chunks themselves (`chunk-NNNNN.bin`, canonical bytes) live apart, under the chunk root
that `engine.json` names (`chunk_root`, with the same `load/<id>/` and `save/<id>/` folders,
and the agent's `pool/` of chunk files kept for reuse, see `pool`):
by default a folder in `/dev/shm`, so a chunk is shared memory that one side writes and the
other maps. A thawed chunk is written once from the socket's buffer and copied once, by the
worker, from the mapping into the paged cache; a frozen one is gathered by the worker
straight into its mapping. `kv_connector_extra_config.cwm_chunk_dir` picks another place
(any local folder; a disk only costs speed).

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
KEEP_FILE = "keep.json"
POOL_DIR = "pool"
FIRST_USE_DIR = "first-use"
STAGING_VERSION = 2
SHM_ROOT = Path("/dev/shm")

OP_ID_RE = re.compile(r"\A[0-9a-f]{32}\Z")


def new_op_id() -> str:
    return uuid.uuid4().hex


def valid_op_id(value: Any) -> bool:
    return isinstance(value, str) and OP_ID_RE.match(value) is not None


def result_path(directory: Path, rank: int = 0) -> Path:
    """Where worker rank `rank` writes an order's outcome (rank 0: `result.json`)."""
    return directory / (RESULT_FILE if rank == 0 else f"result.rank{rank}.json")


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


def default_chunk_root(root: Path) -> Path:
    """Where the chunks of the staging directory `root` live unless configured: a folder of
    `/dev/shm` named after `root` (so two vLLM servers never share one), or `root` itself
    where there is no `/dev/shm`."""
    import hashlib

    if SHM_ROOT.is_dir() and os.access(SHM_ROOT, os.W_OK):
        digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
        return SHM_ROOT / f"cwm-chunks-{digest}"
    return root


def ensure_chunk_root(chunk_root: Path) -> None:
    for name in (LOAD_DIR, SAVE_DIR):
        (chunk_root / name).mkdir(parents=True, exist_ok=True, mode=0o700)


def recycle_chunks(folder: Path, pool: Path) -> None:
    """Move a finished order's chunk files into the agent's pool folder (which adopts files
    it finds there), so later thaws write over their pages."""
    if not pool.is_dir():
        return
    with contextlib.suppress(OSError):
        for path in folder.iterdir():
            if path.is_file() and not path.is_symlink():
                with contextlib.suppress(OSError):
                    os.rename(path, pool / f"{uuid.uuid4().hex}.bin")


def clear_chunk_root(chunk_root: Path) -> None:
    """Remove every staged chunk under `chunk_root`, and the folders themselves where they
    are then empty (a chunk root shared with other files keeps them)."""
    for name in (LOAD_DIR, SAVE_DIR, POOL_DIR):
        folder = chunk_root / name
        if folder.is_dir():
            for order in folder.iterdir():
                remove_tree(order)
        with contextlib.suppress(OSError):
            folder.rmdir()
    with contextlib.suppress(OSError):
        chunk_root.rmdir()


class MappedFile:
    """A staged chunk file mapped into memory: `buffer` is writable (a shared mapping when
    the file was opened for writing, else a private copy-on-write one that is only read),
    so numpy and torch can wrap it without copying. Close it before the file is removed
    from a tmpfs, or the pages stay allocated. `shared=True` opens a file that several
    writers fill at once (tensor-parallel ranks, each its own columns) without truncating
    what another has written."""

    def __init__(self, path: Path, size: int | None = None, *, shared: bool = False) -> None:
        import mmap

        writing = size is not None
        truncate = 0 if shared else os.O_TRUNC
        flags = os.O_RDWR | os.O_CREAT | truncate if writing else os.O_RDONLY
        fd = os.open(path, flags, 0o600)
        try:
            if writing:
                assert size is not None
                os.ftruncate(fd, size)
            else:
                size = os.fstat(fd).st_size
            self.size = size
            if size == 0:
                self._map: Any = None
                self.buffer = memoryview(bytearray())
                return
            if writing:
                self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
            else:
                self._map = mmap.mmap(
                    fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
                )
            self.buffer = memoryview(self._map)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.buffer.release()
        if self._map is not None:
            with contextlib.suppress(BufferError):
                self._map.close()

    def __enter__(self) -> MappedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


def keep_expiry(note: Any, cache_salt: str | None = None) -> float | None:
    """The expiry (Unix time) a `keep.json` note gives, checked against `cache_salt` when
    given; None for anything else (no note, another salt, a malformed one)."""
    if not isinstance(note, dict) or (
        cache_salt is not None and note.get("cache_salt") != cache_salt
    ):
        return None
    value = note.get("expires_at")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


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
