"""llama-server's slots as cwm sessions, beside an unmodified server.

llama-server (started with `--slot-save-path DIR`) can write a slot's KV to a file in DIR and
read one back (`POST /slots/{id}?action=save|restore`). The agent runs beside it, on the same
machine, with the same DIR:

- a session is a slot holding tokens, named `slot-N`; a client continues it by sending
  `"id_slot": N` with a prompt that extends the slot's tokens;
- freeze: the slot is saved to a file of the agent's own name, which is read, parsed into
  canonical chunks (`state_format`) and removed;
- thaw: the window's chunks (already verified by the agent) are assembled into one slot file
  in the target's layout (stream count, V transposed or not), written under a name of the
  agent's own, restored into the chosen empty slot and removed. llama.cpp's restore replaces
  the whole sequence, so one file per thaw: nothing reaches the slot until every chunk of the
  window has arrived and checked out.

What the fingerprint needs that the server does not say (the KV type and the V layout) is read
off a saved slot at start-up; with every slot empty, the agent evaluates a one-token prompt in
an empty slot, saves it and erases it again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import mmap
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import structlog

from cwm_client import pb
from cwm_client.chunks import bytes_per_token
from cwm_client.errors import (
    Aborted,
    AlreadyExists,
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
from cwm_server.agent.engines.llamacpp.gguf_identity import GgufError, GgufModel
from cwm_server.agent.engines.llamacpp.state_format import (
    GGML_TYPE_NAMES,
    StateFormatError,
    StateLayout,
    StateWriter,
    parse_seq_state,
    parse_slot_file,
    slot_file_prefix,
    split_chunks,
    state_size,
    stream_count,
)

log = structlog.get_logger("cwm.agent.llama_server")

ENGINE_NAME = "llama.cpp"
SESSION_RE = re.compile(r"slot-(0|[1-9][0-9]{0,5})")
FILE_PREFIX = "cwm-"
"""The agent's own files in the slot directory start with this; nothing else there is touched."""
LOCK_FILE = "cwm-agent.lock"


class LlamaServerError(FailedPrecondition):
    """llama-server refused a request; the message carries its answer."""


def slot_of(session_id: str) -> int:
    match = SESSION_RE.fullmatch(session_id)
    if match is None:
        raise InvalidArgument(
            f"llama-server sessions are slots named slot-N, not {session_id[:40]!r}",
            field="new_session_id",
        )
    return int(match.group(1))


class LlamaServerAdapter(EngineAdapter):
    def __init__(
        self,
        url: str,
        slot_dir: str | Path,
        model_path: str | Path | None = None,
        request_timeout: float = 600.0,
        start_timeout: float = 120.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.slot_dir = Path(slot_dir).resolve()
        self.request_timeout = request_timeout
        if not self.slot_dir.is_dir():
            raise FailedPrecondition(f"the slot directory {self.slot_dir} does not exist")
        self._claim = self._claim_slot_dir()
        props = self._wait_for_server(start_timeout)
        self.total_slots = int(props.get("total_slots") or 1)
        self.build = str(props.get("build_info") or "unknown")
        path = model_path or props.get("model_path")
        if not path:
            raise FailedPrecondition("llama-server does not say which model it runs: pass --model")
        try:
            self.model = GgufModel.load(path)
        except (OSError, GgufError) as exc:
            raise FailedPrecondition(f"cannot fingerprint the model {path}: {exc}") from None
        if self.model.sliding_window:
            raise FailedPrecondition(
                f"{self.model.name} has sliding-window attention layers, whose KV llama.cpp "
                "keeps in a second cache; only single-cache models can be frozen yet"
            )
        self._lock = threading.Lock()
        self._seen: dict[int, tuple[Any, float]] = {}
        self._importing: set[int] = set()
        self._restored: dict[int, tuple[Any, int]] = {}
        """Slots this agent restored: /slots lists a slot's tokens only once a request ran in
        it, so until its task changes the count is the one restored."""
        self.layout = self._probe_layout()
        self._fingerprint = self.model.fingerprint(
            ENGINE_NAME, self.build, self.layout.kv_type, self.layout.v_trans
        )
        log.info(
            "llama_server_ready",
            url=self.url,
            model=self.model.name,
            slots=self.total_slots,
            build=self.build,
            kv_type=GGML_TYPE_NAMES[self.layout.kv_type],
            v_trans=self.layout.v_trans,
            streams=self.layout.n_stream,
        )

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> LlamaServerAdapter:
        if not settings.llama_url or not settings.slot_dir:
            raise EngineSettingsError(
                "cwm agent --engine llama-server needs --llama-url (the server) and --slot-dir "
                "(the directory it was started with as --slot-save-path); see docs/LLAMACPP.md"
            )
        return cls(settings.llama_url, settings.slot_dir, settings.model)

    def close(self) -> None:
        if self._claim is not None:
            self._claim.close()  # releases the lock
            self._claim = None

    # -- discovery ----------------------------------------------------------------------

    def _claim_slot_dir(self) -> IO[bytes]:
        """One agent per server: two would hand out the same free slot and remove each
        other's files. Holding the lock also makes the files a killed agent left (a
        half-written thaw, a saved slot not yet read) safe to remove now."""
        claim = open(self.slot_dir / LOCK_FILE, "ab")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(claim.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            claim.close()
            raise FailedPrecondition(
                f"another cwm agent already serves the llama-server slots in {self.slot_dir}",
                reason="SLOT_DIR_IN_USE",
            ) from None
        for stale in self.slot_dir.glob(f"{FILE_PREFIX}*-*.bin"):
            stale.unlink(missing_ok=True)
        return claim

    def _wait_for_server(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Exception | str = "no answer"
        while time.monotonic() < deadline:
            try:
                props = self._get("/props")
                if isinstance(props, dict) and "total_slots" in props:
                    return props
                last = f"unexpected /props answer {str(props)[:200]}"
            except (Unavailable, LlamaServerError) as exc:
                last = exc  # 503 while the model loads
            time.sleep(0.3)
        raise Unavailable(f"llama-server at {self.url} did not answer /props: {last}")

    def _probe_layout(self) -> StateLayout:
        """The target layout, read off a saved slot. /slots does not list a slot restored
        before any request ran in it, so each slot is saved until one holds tokens; only
        when all are truly empty does a one-token prompt run in one (erased again)."""
        streams = 0
        slots = self._slots()
        for slot in slots:
            tokens, blob = self._save(int(slot["id"]))
            if tokens:
                return parse_seq_state(blob).layout
            streams = stream_count(blob)
        scratch = int(slots[-1]["id"])
        bos = self._post("/tokenize", {"content": "a", "add_special": True}).get("tokens") or [1]
        self._post(
            "/completion",
            {"prompt": bos[:1], "n_predict": 1, "id_slot": scratch, "cache_prompt": True},
        )
        try:
            _, blob = self._save(scratch)
            layout = parse_seq_state(blob).layout
        finally:
            self._post(f"/slots/{scratch}?action=erase", {})
        return StateLayout(streams or layout.n_stream, layout.v_trans, layout.kv_type)

    # -- EngineAdapter ------------------------------------------------------------------

    @property
    def fingerprint(self) -> pb.ModelFingerprint:
        return self._fingerprint

    @property
    def endpoint(self) -> str:
        return self.url

    def default_chunk_tokens(self) -> int:
        return chunk_tokens_for(bytes_per_token(self._fingerprint))

    def new_session_id(self) -> str:
        with self._lock:
            importing = set(self._importing)
        for slot_id, count in sorted(self._occupancy(self._slots()).items()):
            if count == 0 and slot_id not in importing:
                return f"slot-{slot_id}"
        raise ResourceExhausted(
            f"all {self.total_slots} llama-server slots hold sessions: erase one or start the "
            "server with more (--parallel)"
        )

    def request_fields(self, session_id: str) -> dict[str, Any]:
        return {"id_slot": slot_of(session_id), "cache_prompt": True}

    def sessions(self) -> list[EngineSession]:
        now = time.time()
        out = []
        slots = self._slots()
        counts = self._occupancy(slots)
        with self._lock:
            for slot in slots:
                slot_id = int(slot["id"])
                count = counts[slot_id]
                state = (slot.get("id_task"), count, slot.get("is_processing"))
                seen = self._seen.get(slot_id)
                if seen is None or seen[0] != state or slot.get("is_processing"):
                    seen = (state, now)
                    self._seen[slot_id] = seen
                if count > 0:
                    name = f"slot-{slot_id}"
                    out.append(EngineSession(name, name, count, seen[1]))
        return out

    def export_session(self, session_id: str, chunk_tokens: int) -> ExportedKV:
        slot = slot_of(session_id)
        held = self._occupancy(self._slots()).get(slot, 0)
        self._check_room(held * bytes_per_token(self._fingerprint) + (1 << 20), f"save slot {slot}")
        tokens, blob = self._save(slot)
        if not tokens:
            with self._lock:
                self._restored.pop(slot, None)  # erased by someone before its first request
            raise NotFound(f"slot {slot} holds no session", reason="SESSION_NOT_FOUND")
        try:
            state = parse_seq_state(blob)
        except StateFormatError as exc:
            raise FailedPrecondition(f"slot {slot}'s state cannot be frozen: {exc}") from None
        if (state.layout.v_trans, state.layout.kv_type) != (
            self.layout.v_trans,
            self.layout.kv_type,
        ):
            raise FailedPrecondition(
                "llama-server's KV layout changed since the agent started (restarted with "
                "other flags?): restart the agent"
            )
        if state.token_count != len(tokens):
            raise FailedPrecondition(
                f"slot {slot} lists {len(tokens)} tokens but holds KV for {state.token_count}"
            )
        return ExportedKV(token_ids=tokens, chunks=split_chunks(state.kv, chunk_tokens))

    def begin_import(
        self, session_id: str, token_ids: Sequence[int], chunk_tokens: int
    ) -> ImportSink:
        """The window goes straight into a slot file of the agent's own, mapped, chunk by
        chunk as they arrive (one copy each); the slot is touched only by `finish`."""
        return _SlotImport(self, slot_of(session_id), [int(t) for t in token_ids])

    def import_session(
        self,
        session_id: str,
        token_ids: Sequence[int],
        chunks: Sequence[bytes],
        chunk_tokens: int,
    ) -> None:
        feed_import(self.begin_import(session_id, token_ids, chunk_tokens), chunks)

    # -- slot files ---------------------------------------------------------------------

    def _file(self, verb: str) -> Path:
        return self.slot_dir / f"{FILE_PREFIX}{verb}-{uuid.uuid4().hex}.bin"

    def _check_room(self, needed: int, what: str) -> None:
        """Refuse before llama-server or the agent writes a file of `needed` bytes the slot
        directory cannot hold (a half-written slot file helps nobody)."""
        free = shutil.disk_usage(self.slot_dir).free
        if free < needed:
            raise ResourceExhausted(
                f"the slot directory {self.slot_dir} has {free >> 20} MiB free; to {what} "
                f"needs about {needed >> 20} MiB",
                reason="DISK_FULL",
            )

    def _save(self, slot: int) -> tuple[list[int], memoryview]:
        """The slot's tokens and state, saved by llama-server into a file of the agent's own
        and mapped (not read: the parse copies what it needs once); the file is removed at
        once, its pages go when the last view of them does."""
        path = self._file("freeze")
        try:
            self._post(f"/slots/{slot}?action=save", {"filename": path.name})
            try:
                data = _map_file(path)
            except FileNotFoundError:
                raise FailedPrecondition(
                    f"llama-server saved slot {slot} but not into {self.slot_dir}: start it "
                    f"with --slot-save-path {self.slot_dir}"
                ) from None
        finally:
            path.unlink(missing_ok=True)
        try:
            tokens, blob = parse_slot_file(data)
        except StateFormatError as exc:
            raise FailedPrecondition(f"slot {slot}'s save file cannot be read: {exc}") from None
        return tokens, blob

    def _restore(self, slot: int, path: Path, tokens: int) -> None:
        answer = self._post(f"/slots/{slot}?action=restore", {"filename": path.name})
        restored = int(answer.get("n_restored", -1)) if isinstance(answer, dict) else -1
        if restored != tokens:
            raise LlamaServerError(f"llama-server restored {restored} tokens of {tokens}")
        log.info("slot_restored", slot=slot, tokens=restored, bytes=path.stat().st_size)

    # -- HTTP -----------------------------------------------------------------------------

    def _slots(self) -> list[dict[str, Any]]:
        slots = self._get("/slots")
        if not isinstance(slots, list) or not slots:
            raise LlamaServerError(
                "llama-server's /slots did not list its slots (started with --no-slots?)"
            )
        return sorted(slots, key=lambda s: int(s["id"]))

    @staticmethod
    def _tokens_in(slot: dict[str, Any]) -> int:
        return int(slot.get("n_prompt_tokens") or 0)

    def _occupancy(self, slots: list[dict[str, Any]]) -> dict[int, int]:
        """Tokens held per slot: what /slots says, or what this agent restored into a slot
        no request has used since."""
        counts = {}
        with self._lock:
            for slot in slots:
                slot_id = int(slot["id"])
                restored = self._restored.get(slot_id)
                if restored is not None and slot.get("id_task") == restored[0]:
                    counts[slot_id] = restored[1]
                else:
                    self._restored.pop(slot_id, None)
                    counts[slot_id] = self._tokens_in(slot)
        return counts

    def _get(self, path: str) -> Any:
        return self._send(urllib.request.Request(f"{self.url}{path}"))

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        return self._send(
            urllib.request.Request(
                f"{self.url}{path}",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
        )

    def _send(self, request: urllib.request.Request) -> Any:
        try:
            with urllib.request.urlopen(request, timeout=self.request_timeout) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            if exc.code == 503:
                raise Unavailable(f"llama-server is not ready: {detail}") from None
            raise LlamaServerError(
                f"llama-server answered {exc.code} to {request.full_url}: {detail}",
                reason="LLAMA_SERVER_ERROR",
            ) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise Unavailable(f"llama-server at {self.url} is unreachable: {exc}") from None


def _map_file(path: Path) -> mmap.mmap | bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return mmap.mmap(fd, size, prot=mmap.PROT_READ) if size else b""
    finally:
        os.close(fd)


class _SlotImport(ImportSink):
    """One thaw into one slot: the slot reserved, its file created (full size allocated up
    front, so a full disk is an error here, never a fault later), mapped and filled as the
    chunks arrive; `finish` restores it into the slot; every path removes the file."""

    def __init__(self, adapter: LlamaServerAdapter, slot: int, tokens: list[int]) -> None:
        if slot >= adapter.total_slots:
            raise InvalidArgument(
                f"llama-server has slots 0..{adapter.total_slots - 1}, not {slot}",
                field="new_session_id",
            )
        if not tokens:
            raise InvalidArgument("a window without tokens cannot be restored")
        self._adapter, self._slot, self._tokens = adapter, slot, tokens
        with adapter._lock:
            if slot in adapter._importing:
                raise AlreadyExists(f"a thaw into slot {slot} is already running")
            adapter._importing.add(slot)
        self._path: Path | None = None
        self._map: mmap.mmap | None = None
        try:
            if adapter._occupancy(adapter._slots()).get(slot, 0) > 0:
                raise AlreadyExists(f"slot {slot} already holds a session")
            model = adapter.model
            width = model.num_kv_heads * model.head_dim
            prefix = slot_file_prefix(tokens)
            size = len(prefix) + state_size(adapter.layout, model.num_layers, width, len(tokens))
            adapter._check_room(size, f"stage a window of {len(tokens)} tokens")
            self._path = adapter._file("thaw")
            self._map = self._create(self._path, size)
            self._map[: len(prefix)] = prefix
            self._writer = StateWriter(
                memoryview(self._map)[len(prefix) :],
                adapter.layout,
                model.num_layers,
                width,
                len(tokens),
            )
        except BaseException:
            self.abort()
            raise

    @staticmethod
    def _create(path: Path, size: int) -> mmap.mmap:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.posix_fallocate(fd, 0, size)
            return mmap.mmap(fd, size)
        except OSError as exc:
            raise ResourceExhausted(
                f"cannot stage the window for llama-server in {path.parent}: {exc}",
                reason="DISK_FULL" if exc.errno == errno.ENOSPC else "",
            ) from None
        finally:
            os.close(fd)

    def add_chunk(self, index: int, data: bytes | memoryview, digest: bytes | None = None) -> None:
        try:
            self._writer.add(data)
        except ValueError as exc:
            raise InvalidArgument(f"the window's KV does not fit this model: {exc}") from None

    def finish(self) -> None:
        try:
            try:
                self._writer.check_complete()
            except ValueError as exc:
                raise InvalidArgument(f"the window's KV does not fit this model: {exc}") from None
            assert self._map is not None and self._path is not None
            del self._writer  # its views into the map must go before the map closes
            self._map.close()
            self._map = None
            adapter = self._adapter
            slots = adapter._slots()
            if adapter._occupancy(slots).get(self._slot, 0) > 0:
                # A client's request took the slot while the window was arriving; restoring
                # now would overwrite its session (the check narrows that race to the last
                # moment; llama-server has no compare-and-restore to close it).
                raise Aborted(
                    f"a request started a session in slot {self._slot} during the thaw; "
                    "thaw again into another slot",
                    reason="SLOT_TAKEN",
                )
            task = next((s.get("id_task") for s in slots if int(s["id"]) == self._slot), None)
            adapter._restore(self._slot, self._path, len(self._tokens))
            with adapter._lock:
                adapter._restored[self._slot] = (task, len(self._tokens))
        finally:
            self.abort()

    def abort(self) -> None:
        if self._map is not None:
            self.__dict__.pop("_writer", None)
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        if self._path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._path)
            self._path = None
        with self._adapter._lock:
            self._adapter._importing.discard(self._slot)
