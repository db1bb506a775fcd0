"""The vLLM engine behind the agent's `EngineAdapter` contract.

The agent runs beside a vLLM server that loaded `CwmConnector` (see `connector`); the
two share a staging directory (`staging`). This adapter never touches vLLM's memory:

- `sessions()` reads the records the connector writes for every finished request that had a
  `cache_salt` (session id == cache_salt, as with the reference engine). `token_count` is
  the number of tokens a freeze would capture: the tokens with KV, rounded down to whole
  blocks (vLLM only keeps whole blocks in its prefix cache). The newest `max_sessions`
  records are kept; older ones are deleted.
- `export_session` registers a save under a fresh id, re-submits the session's tokens (plus
  the next one, so every whole block is a prefix-cache hit) with a save directive, and reads
  the canonical chunks the connector wrote, checking each one's BLAKE3 digest.
- `begin_import` (and `import_session` on top of it) stages each chunk of the window as it
  arrives, under a fresh id in the chunk root (shared memory by default: one copy from the
  receive buffer), then the manifest; submits the window's tokens plus one with a load
  directive and the session's salt, and checks what the scheduler claimed and the worker
  loaded. Each chunk is written over a file of the agent's staging pool where it holds one
  (`pool`: no fresh pages), and chunk files the worker is done with go back to it. The
  blocks then sit in vLLM's prefix cache under that salt. A loaded window
  stays staged for the session's first request (`kept`: the connector re-loads what the
  prefix cache lost by then) until that request, its expiry or the kept-bytes budget;
  other staging is removed on every path, and an agent that starts removes what a dead one
  left (adopting its kept windows).
- `default_chunk_tokens` sizes chunks from vLLM's KV bytes per token (`chunk_tokens_for`).

Only whole blocks move: a window's tokens are cut to a multiple of the block size (128 on
CPU), and `chunk_tokens` must be a multiple of it.
"""

from __future__ import annotations

import errno
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import blake3
import structlog

from cwm_client import pb
from cwm_client.chunks import bytes_per_token
from cwm_client.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from cwm_server.agent.engines.base import (
    EngineAdapter,
    EngineSession,
    EngineSettings,
    EngineSettingsError,
    ExportedKV,
    ImportSink,
    chunk_tokens_for,
    feed_import,
)
from cwm_server.agent.engines.fingerprint import kv_dtype_from_name, model_fingerprint
from cwm_server.agent.engines.vllm import staging
from cwm_server.agent.engines.vllm.kept import KeptWindows
from cwm_server.agent.engines.vllm.pool import ChunkPool

ENGINE_NAME = "vllm"
log = structlog.get_logger("cwm.agent.vllm")


class VllmError(FailedPrecondition):
    """vLLM answered a request with an error."""


def _cwm_version() -> str:
    try:
        return metadata.version("cwm")
    except metadata.PackageNotFoundError:
        return "unknown"


class VllmAdapter(EngineAdapter):
    def __init__(
        self,
        url: str,
        staging_dir: str | Path,
        model_dir: str | Path | None = None,
        *,
        max_sessions: int = 4096,
        request_timeout: float = 600.0,
        startup_timeout: float = 300.0,
        result_timeout: float = 120.0,
        keep_seconds: float = 600.0,
        keep_bytes: int = 4 << 30,
        pool_bytes: int = 2 << 30,
    ) -> None:
        self.url = url.rstrip("/")
        self.root = Path(staging_dir).resolve()
        self.request_timeout = request_timeout
        self.result_timeout = result_timeout
        self.max_sessions = max_sessions
        self._lock = threading.Lock()
        self._records: dict[Path, tuple[int, int, EngineSession]] = {}
        staging.ensure_layout(self.root)
        self.model_name, root = self._wait_for_server(startup_timeout)
        self.engine_info = self._wait_for_engine_file(startup_timeout)
        self.chunk_root = Path(str(self.engine_info.get("chunk_root") or self.root))
        staging.ensure_chunk_root(self.chunk_root)
        self.pool = ChunkPool(self.chunk_root, pool_bytes)
        self.kept = KeptWindows(
            self.root, self.chunk_root, keep_seconds, keep_bytes, recycle=self.pool.give_folder
        )
        self._remove_stale_orders()
        self.block_size = int(self.engine_info["block_size"])
        # Tensor-parallel ranks: each writes its own outcome of every order.
        self.ranks = int(self.engine_info.get("tensor_parallel_size") or 1)
        self.model_dir = Path(model_dir or self.engine_info.get("model") or root)
        if not self.model_dir.is_dir():
            raise FailedPrecondition(
                f"vLLM serves {self.engine_info.get('model')!r}, which is not a local directory; "
                "pass --model with the model's directory so its weights can be fingerprinted"
            )
        self._fingerprint = self._make_fingerprint()

    def _remove_stale_orders(self) -> None:
        """Orders of an agent that died are dead too: nobody will read their files. Its
        kept windows are adopted, and the ones a request claimed are the connector's."""
        live: set[str] = set()
        for order in (self.root / staging.LOAD_DIR).iterdir():
            name = order.name
            if staging.valid_op_id(name) and (self.kept.adopt(name) or self.kept.claimed(name)):
                live.add(name)
        for base in {self.root, self.chunk_root}:
            for kind in (staging.LOAD_DIR, staging.SAVE_DIR):
                for stale in (base / kind).iterdir():
                    if not (kind == staging.LOAD_DIR and stale.name in live):
                        staging.remove_tree(stale)

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> VllmAdapter:
        """Drive the vLLM server at `settings.vllm_url` through the staging directory
        `settings.vllm_dir` it shares with the connector."""
        if not settings.vllm_url or not settings.vllm_dir:
            raise EngineSettingsError(
                "cwm agent --engine vllm needs --vllm-url (the vLLM server) and --vllm-dir "
                "(the connector's cwm_dir); see docs/VLLM.md"
            )
        return cls(
            settings.vllm_url,
            settings.vllm_dir,
            settings.model,
            keep_seconds=settings.vllm_keep_seconds,
            keep_bytes=settings.vllm_keep_mib << 20,
            pool_bytes=settings.vllm_pool_mib << 20,
        )

    # -- discovery ----------------------------------------------------------------------

    def _wait_for_server(self, timeout: float) -> tuple[str, str]:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                models = self._get("/v1/models")
                first = models["data"][0]
                return str(first["id"]), str(first.get("root") or first["id"])
            except (OSError, KeyError, IndexError, ValueError, VllmError) as exc:
                last = exc
                time.sleep(0.5)
        raise Unavailable(f"vLLM at {self.url} did not answer /v1/models: {last}")

    def _wait_for_engine_file(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        path = self.root / staging.ENGINE_FILE
        while time.monotonic() < deadline:
            info = staging.read_json(path)
            if isinstance(info, dict) and info.get("staging_version") == staging.STAGING_VERSION:
                return info
            time.sleep(0.2)
        raise FailedPrecondition(
            f"no cwm connector writes to {self.root}: start vLLM with the CwmConnector and "
            f"kv_connector_extra_config.cwm_dir = {str(self.root)!r} (see docs/VLLM.md)"
        )

    def _make_fingerprint(self) -> pb.ModelFingerprint:
        info = self.engine_info
        fingerprint = model_fingerprint(
            self.model_dir,
            kv_dtype=str(info["kv_dtype"]),
            engine_name=ENGINE_NAME,
            block_size=self.block_size,
        )
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            if getattr(fingerprint, name) != int(info[name]):
                raise FailedPrecondition(
                    f"the model directory {self.model_dir} says {name}="
                    f"{getattr(fingerprint, name)} but vLLM runs {info[name]}: is --model the "
                    "model vLLM serves?"
                )
        # The kernels that produced the KV bits: vLLM's, on this torch, with this CPU ISA.
        fingerprint.engine_version = (
            f"cwm {_cwm_version()}; vllm {info['vllm_version']}; torch {info['torch_version']}; "
            f"{info['platform']} attention {info['attention_isa']}"
        )
        fingerprint.kv_dtype = kv_dtype_from_name(str(info["kv_dtype"]))  # type: ignore[assignment]
        return fingerprint

    # -- EngineAdapter ------------------------------------------------------------------

    def close(self) -> None:
        """The staging pool is only worth its memory while this agent thaws: free it. (Kept
        windows stay: the connector may still serve their first requests, and the next
        agent adopts them.)"""
        self.pool.drain()

    @property
    def fingerprint(self) -> pb.ModelFingerprint:
        return self._fingerprint

    @property
    def endpoint(self) -> str:
        return self.url

    def sessions(self) -> list[EngineSession]:
        self.kept.sweep()  # polled by the agent: kept windows expire on time
        out = []
        seen = set()
        with self._lock:
            for path in (self.root / staging.SESSIONS_DIR).glob("*.json"):
                seen.add(path)
                try:
                    stat = path.stat()
                except OSError:
                    continue
                cached = self._records.get(path)
                if cached is not None and cached[:2] == (stat.st_mtime_ns, stat.st_size):
                    out.append(cached[2])
                    continue
                record = staging.read_json(path)
                session = self._session_from(record)
                if session is not None:
                    self._records[path] = (stat.st_mtime_ns, stat.st_size, session)
                    out.append(session)
            for gone in set(self._records) - seen:
                del self._records[gone]
        if len(out) > self.max_sessions:
            # Every salted request leaves a record; keep the most recent ones.
            out.sort(key=lambda s: s.last_active, reverse=True)
            for old in out[self.max_sessions :]:
                staging.session_path(self.root, old.cache_salt).unlink(missing_ok=True)
            out = out[: self.max_sessions]
        return out

    def _session_from(self, record: Any) -> EngineSession | None:
        if not isinstance(record, dict) or not isinstance(record.get("cache_salt"), str):
            return None
        token_ids = record.get("token_ids") or []
        kv_tokens = min(int(record.get("kv_tokens", 0)), len(token_ids))
        return EngineSession(
            session_id=record["cache_salt"],
            cache_salt=record["cache_salt"],
            token_count=kv_tokens // self.block_size * self.block_size,
            last_active=float(record.get("finished_at", 0.0)),
        )

    def _record(self, session_id: str) -> dict[str, Any] | None:
        record = staging.read_json(staging.session_path(self.root, session_id))
        if isinstance(record, dict) and record.get("cache_salt") == session_id:
            return record
        return None

    def _check_chunk_tokens(self, chunk_tokens: int) -> None:
        if chunk_tokens <= 0 or chunk_tokens % self.block_size:
            raise InvalidArgument(
                f"chunk_tokens {chunk_tokens} must be a positive multiple of vLLM's block size "
                f"{self.block_size}",
                field="chunk_tokens",
            )

    def export_session(self, session_id: str, chunk_tokens: int) -> ExportedKV:
        self._check_chunk_tokens(chunk_tokens)
        record = self._record(session_id)
        if record is None:
            raise NotFound(f"no session {session_id!r} on this engine", reason="SESSION_NOT_FOUND")
        token_ids = [int(t) for t in record["token_ids"]]
        kv_tokens = min(int(record.get("kv_tokens", 0)), len(token_ids))
        tokens = kv_tokens // self.block_size * self.block_size
        if tokens == 0:
            raise FailedPrecondition(
                f"session {session_id!r} has {kv_tokens} tokens of KV, less than one whole "
                f"block of {self.block_size}: nothing to freeze yet"
            )
        op_id = staging.new_op_id()
        directory = staging.op_dir(self.root, staging.SAVE_DIR, op_id)
        chunk_dir = staging.op_dir(self.chunk_root, staging.SAVE_DIR, op_id)
        directory.mkdir(parents=True)
        try:
            staging.write_json_atomic(
                directory / staging.REQUEST_FILE,
                {"cache_salt": session_id, "tokens": tokens, "chunk_tokens": chunk_tokens},
            )
            # One token past the blocks, so all of them are a prefix-cache hit.
            follow = token_ids[tokens] if len(token_ids) > tokens else token_ids[-1]
            self._complete([*token_ids[:tokens], follow], session_id, "save", op_id)
            result = self._wait_results(directory)
            if result.get("error"):
                raise FailedPrecondition(
                    f"vLLM could not save session {session_id!r}: {result['error']}"
                )
            log.info(
                "vllm_saved",
                session_id=session_id,
                chunks=len(result["chunks"]),
                worker_seconds=result.get("seconds"),
            )
            chunks, digests = [], []
            for chunk in result["chunks"]:
                data = (chunk_dir / str(chunk["file"])).read_bytes()
                digest = blake3.blake3(data).digest()
                # Tensor-parallel ranks fill a chunk together and none of them digests it:
                # this digest, taken once all have reported, is the first.
                if chunk["digest"] is not None and digest.hex() != chunk["digest"]:
                    raise DataLoss(
                        f"staged chunk {chunk['file']} of session {session_id!r} "
                        "changed on disk before it was read"
                    )
                chunks.append(data)
                digests.append(digest)
            return ExportedKV(token_ids=token_ids[:tokens], chunks=chunks, digests=digests)
        finally:
            staging.remove_tree(directory)
            staging.remove_tree(chunk_dir)

    def default_chunk_tokens(self) -> int:
        return chunk_tokens_for(bytes_per_token(self._fingerprint), self.block_size)

    def import_session(
        self,
        session_id: str,
        token_ids: Sequence[int],
        chunks: Sequence[bytes],
        chunk_tokens: int,
    ) -> None:
        feed_import(self.begin_import(session_id, token_ids, chunk_tokens), chunks)

    def begin_import(
        self, session_id: str, token_ids: Sequence[int], chunk_tokens: int
    ) -> _StagedImport:
        if self._record(session_id) is not None:
            raise AlreadyExists(f"the engine already has a session {session_id!r}")
        self._check_chunk_tokens(chunk_tokens)
        ids = [int(t) for t in token_ids]
        tokens = len(ids) // self.block_size * self.block_size
        if tokens == 0:
            raise InvalidArgument(
                f"the window holds {len(ids)} tokens, less than one block of {self.block_size}"
            )
        return _StagedImport(self, session_id, ids, tokens, chunk_tokens)

    def _load_staged(self, session_id: str, ids: list[int], tokens: int, op_id: str) -> None:
        """Submit the load of a completely staged window and record the new session."""
        directory = staging.op_dir(self.root, staging.LOAD_DIR, op_id)
        follow = ids[tokens] if len(ids) > tokens else ids[-1]
        try:
            self._submit_load([*ids[:tokens], follow], session_id, op_id)
        except VllmError:
            # kv_load_failure_policy=fail: vLLM failed the request; say why if we know.
            if any(
                isinstance(staging.read_json(staging.result_path(directory, rank)), dict)
                for rank in range(self.ranks)
            ):
                self._check_load(directory, session_id)
            raise
        self._check_load(directory, session_id)
        staging.write_json_atomic(
            staging.session_path(self.root, session_id),
            {
                "cache_salt": session_id,
                "token_ids": ids,
                "kv_tokens": tokens,
                "block_size": self.block_size,
                "finished_at": time.time(),
                "thawed": True,
            },
        )

    def _manifest(
        self, session_id: str, ids: list[int], tokens: int, chunk_tokens: int, refs: list[Any]
    ) -> dict[str, Any]:
        info = self.engine_info
        return {
            "cache_salt": session_id,
            "tokens": tokens,
            "token_ids": ids[:tokens],
            "chunk_tokens": chunk_tokens,
            "chunks": refs,
            "layout": {
                "num_layers": int(info["num_layers"]),
                "num_kv_heads": int(info["num_kv_heads"]),
                "head_dim": int(info["head_dim"]),
                "kv_dtype": str(info["kv_dtype"]),
                "block_size": self.block_size,
            },
        }

    def _submit_load(self, prompt: list[int], session_id: str, op_id: str) -> None:
        self._complete(prompt, session_id, "load", op_id)

    def _check_load(self, directory: Path, session_id: str) -> None:
        note = self._wait_result(directory / staging.SCHEDULER_FILE)
        if note.get("refusal"):
            raise FailedPrecondition(f"vLLM refused the window: {note['refusal']}")
        if note.get("already_cached"):
            return
        result = self._wait_results(directory)
        log.info(
            "vllm_loaded",
            session_id=session_id,
            blocks=result.get("loaded_blocks"),
            worker_seconds=result.get("seconds"),
            asynchronous=result.get("asynchronous"),
        )
        if result.get("error"):
            policy = self.engine_info.get("kv_load_failure_policy", "fail")
            raise DataLoss(
                f"vLLM loaded {result.get('loaded_blocks', 0)} of {result.get('blocks', 0)} "
                f"blocks of session {session_id!r}: {result['error']} (vLLM's "
                f"kv_load_failure_policy={policy}: the rest were "
                f"{'recomputed' if policy == 'recompute' else 'not used'})"
            )

    def _wait_results(self, directory: Path) -> dict[str, Any]:
        """The outcome of an order in `directory`, merged over the worker ranks: an error if
        any rank failed, the fewest blocks any rank loaded, the slowest rank's time. (A
        result without a rank is the scheduler's refusal: no rank will write one.)"""
        first = self._wait_result(staging.result_path(directory, 0))
        if self.ranks == 1 or "rank" not in first:
            return first
        results = [first] + [
            self._wait_result(staging.result_path(directory, rank)) for rank in range(1, self.ranks)
        ]
        merged = dict(first)
        errors = [str(result["error"]) for result in results if result.get("error")]
        if errors:
            merged["error"] = "; ".join(errors)
        for key in ("loaded_blocks", "loaded_tokens"):
            if key in first:
                merged[key] = min(int(result.get(key, 0)) for result in results)
        merged["seconds"] = max(float(result.get("seconds", 0.0)) for result in results)
        return merged

    def _wait_result(self, path: Path) -> dict[str, Any]:
        deadline = time.monotonic() + self.result_timeout
        while time.monotonic() < deadline:
            result = staging.read_json(path)
            if isinstance(result, dict):
                return result
            time.sleep(0.02)
        raise Unavailable(f"the cwm connector in vLLM did not write {path.name} in time")

    # -- HTTP -----------------------------------------------------------------------------

    def _complete(self, prompt: list[int], cache_salt: str, op: str, op_id: str) -> dict[str, Any]:
        body = {
            "model": self.model_name,
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0,
            "cache_salt": cache_salt,
            "kv_transfer_params": {staging.DIRECTIVE_KEY: {"op": op, "id": op_id}},
        }
        answer: dict[str, Any] = self._post("/v1/completions", body)
        return answer

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as reply:
            return json.loads(reply.read())

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.request_timeout) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise VllmError(f"vLLM answered {exc.code}: {detail}", reason="VLLM_ERROR") from None
        except (urllib.error.URLError, OSError) as exc:
            raise Unavailable(f"vLLM at {self.url} is unreachable: {exc}") from None


class _StagedImport(ImportSink):
    """A window staged for vLLM chunk by chunk: each chunk is written into the chunk root
    (shared memory) as it arrives, with its BLAKE3 digest; `finish` writes the manifest
    (atomically: a load id names a complete staging or nothing), submits the load, and
    then hands the staging to the connector for the session's first request (`kept`) or
    removes it, whatever happens."""

    def __init__(
        self,
        adapter: VllmAdapter,
        session_id: str,
        ids: list[int],
        tokens: int,
        chunk_tokens: int,
    ) -> None:
        self._adapter = adapter
        self._session_id = session_id
        self._ids = ids
        self._tokens = tokens
        self._chunk_tokens = chunk_tokens
        self._op_id = staging.new_op_id()
        self._final = staging.op_dir(adapter.root, staging.LOAD_DIR, self._op_id)
        self._building = self._final.with_name(f".{self._op_id}.building")
        self._chunk_dir = staging.op_dir(adapter.chunk_root, staging.LOAD_DIR, self._op_id)
        self._chunk_dir.mkdir(parents=True)
        self._refs: list[dict[str, Any]] = []
        self._bytes = 0
        self._done = False
        self._submitted = False
        """The load went to vLLM and is not known done: the worker may still read the chunk
        files, so they are removed, never handed to the pool for reuse."""
        self._began = time.perf_counter()
        self._writing_s = 0.0

    def add_chunk(self, index: int, data: bytes | memoryview, digest: bytes | None = None) -> None:
        if index != len(self._refs) and index * self._chunk_tokens < self._tokens:
            raise ValueError(f"chunk {index} arrived out of order (expected {len(self._refs)})")
        start = index * self._chunk_tokens
        if start >= self._tokens:
            # Chunks past the whole blocks (a partial last block) are not staged.
            return
        name = staging.chunk_file_name(index)
        started = time.perf_counter()
        try:
            self._write(self._chunk_dir / name, data)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise ResourceExhausted(
                f"no room to stage chunk {index} of the window in {self._chunk_dir.parent}: "
                f"{exc.strerror}; free space there or point the connector's cwm_chunk_dir "
                "at a larger folder",
                reason="STAGING_FULL",
            ) from None
        self._writing_s += time.perf_counter() - started
        self._bytes += len(data)
        self._refs.append(
            {
                "file": name,
                "token_start": start,
                "token_count": min(self._chunk_tokens, len(self._ids) - start),
                "digest": (digest or blake3.blake3(data).digest()).hex(),
            }
        )

    def _write(self, path: Path, data: bytes | memoryview) -> None:
        """Into a pooled file where there is one; with no room left, once more after the
        pool has given its files back."""
        pool = self._adapter.pool
        try:
            pool.write(path, data)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not pool.drain():
                raise
            path.unlink(missing_ok=True)
            pool.write(path, data)

    @property
    def op_id(self) -> str:
        return self._op_id

    @property
    def directory(self) -> Path:
        """The staged window's folder (manifest, and the connector's notes on it)."""
        return self._final

    @property
    def chunk_dir(self) -> Path:
        return self._chunk_dir

    def stage(self) -> None:
        """Write the manifest: from here on the load id names a complete staging."""
        self._building.mkdir(parents=True)
        staging.write_json_atomic(
            self._building / staging.MANIFEST_FILE,
            self._adapter._manifest(
                self._session_id, self._ids, self._tokens, self._chunk_tokens, self._refs
            ),
        )
        self._building.rename(self._final)

    def finish(self) -> None:
        try:
            self.stage()
            log.info(
                "vllm_staged",
                session_id=self._session_id,
                chunks=len(self._refs),
                seconds=round(time.perf_counter() - self._began, 4),
                writing_seconds=round(self._writing_s, 4),
            )
            self._submitted = True
            self._adapter._load_staged(self._session_id, self._ids, self._tokens, self._op_id)
            self._submitted = False  # loaded: the worker is done with the files
            if self._adapter.kept.keep(self._op_id, self._session_id, self._tokens, self._bytes):
                self._done = True  # the connector's now, until the first request or expiry
        finally:
            self.abort()

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        if not self._submitted:
            self._adapter.pool.give_folder(self._chunk_dir)
        for path in (self._building, self._final, self._chunk_dir):
            staging.remove_tree(path)
