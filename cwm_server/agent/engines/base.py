"""The contract between the host agent and an engine.

Every engine cwm can freeze and thaw (the reference HF-transformers engine, vLLM through its
KV connector) is one sibling folder whose adapter implements `EngineAdapter`; `factory` finds
an adapter by the engine's name. The agent only ever uses these primitives, grouped by role:

- building (`from_settings`, `close`): the factory builds an engine from what `cwm agent` was
  told (`EngineSettings`) and the agent releases it when it stops.
- identity (`fingerprint`, `endpoint`, `request_fields`): what model/engine produced the KV,
  so thaw refuses a window whose fingerprint differs and KV never lands in an engine that
  would misread it; where clients send OpenAI-style requests that continue a session, and
  what those requests carry to reach it.
- sessions (`sessions()`, `new_session_id()`): the live sessions (id = cache_salt, or a
  slot's name on llama-server; token count, last activity), reported to the manager and
  watched by the auto-freeze policy; and the id a thaw gives a session when told none.
- KV out and in:
  * `export_session(session_id, chunk_tokens)`: the exact token ids whose KV the session
    holds and that KV as canonical chunks ([2, L, tokens, H*D], K then V, little-endian, the
    fingerprint's dtype). The bytes of a token span never change once computed, so a
    re-export of a grown session repeats the old full chunks byte for byte (incremental
    freeze).
  * `import_session(session_id, token_ids, chunks, chunk_tokens)`: create a session holding
    exactly that KV, so the next request whose prompt extends `token_ids` computes only the
    new tokens and gives bit-identical results.
  * `begin_import(session_id, token_ids, chunk_tokens)`: the same, chunk by chunk as they
    arrive (`ImportSink`), so an engine that stages chunks (vLLM) writes each one while the
    next is still on the wire; by default the chunks are collected for `import_session`.
  * `default_chunk_tokens()`: the chunk span that suits this engine's KV size.

Adapters are called from worker threads (engines block); they do their own locking.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cwm_client import pb


@dataclass(frozen=True)
class EngineSettings:
    """What `cwm agent` was told about the engine to run; each engine reads the fields it
    needs and ignores the rest, so one factory call builds any of them."""

    model: str | None = None
    """A model directory (the reference engine: the model to run, `tiny` or None for the
    built-in tiny Llama; vLLM: the directory of the model it serves, None for the path it
    reports)."""
    http_host: str = "127.0.0.1"
    """Where an engine that serves its own OpenAI-style API listens."""
    http_port: int = 0
    """0: any free port."""
    vllm_url: str | None = None
    """The vLLM server the connector runs in."""
    vllm_dir: str | None = None
    """The staging directory shared with the vLLM connector (its cwm_dir)."""
    vllm_keep_seconds: float = 600.0
    """How long a thawed vLLM window stays staged for its session's first request (0: not
    kept; the first request recomputes whatever vLLM's prefix cache evicted)."""
    vllm_keep_mib: int = 4096
    """The most staged memory kept windows may hold; past it the oldest are released."""
    vllm_pool_mib: int = 2048
    """Staged chunk files kept for the next thaws to write over (0: none)."""
    llama_url: str | None = None
    """The llama-server whose slots are the sessions."""
    slot_dir: str | None = None
    """The directory llama-server was started with as --slot-save-path."""
    models_dir: Path | None = None
    """Where built-in models are built on first use (None: none may be built)."""


class EngineSettingsError(ValueError):
    """The settings lack something the chosen engine needs; the message says what."""


@dataclass(frozen=True)
class EngineSession:
    session_id: str
    cache_salt: str
    token_count: int
    last_active: float
    """Unix time of the last request that used the session."""


@dataclass(frozen=True)
class ExportedKV:
    token_ids: list[int]
    chunks: list[bytes]
    digests: list[bytes] = field(default_factory=list)
    """The chunks' BLAKE3-256 digests when the engine already checked them (vLLM's connector
    digests what it gathers), so the freeze need not hash them again; empty: compute them."""


TARGET_CHUNK_BYTES = 32 << 20
"""What a chunk's span aims at: tens of MiB, large enough that per-chunk costs vanish, small
enough for the manager's default cap (`--max-chunk-mib` 64) and for pipelining."""
MAX_CHUNK_TOKENS = 2048
"""A small model's chunks stop growing here: the span is also what an incremental freeze
re-sends when a session grows."""


def chunk_tokens_for(bytes_per_token: int, block_size: int = 1, fallback: int = 256) -> int:
    """The chunk span for KV of `bytes_per_token`: a multiple of `block_size` whose chunks
    come closest to `TARGET_CHUNK_BYTES` without passing it (one block when a single block
    is already larger). Llama-3-8B (128 KiB per token) gets 256 tokens (32 MiB); a 70B
    model (320 KiB) 96 tokens with blocks of 16 or one block of 128 on vLLM's CPU build."""
    if bytes_per_token <= 0:
        return fallback
    blocks = TARGET_CHUNK_BYTES // (bytes_per_token * block_size)
    blocks = min(blocks, MAX_CHUNK_TOKENS // block_size)
    return max(1, blocks) * block_size


class ImportSink(ABC):
    """One import in progress: chunks arrive in order, then `finish` makes the session."""

    @abstractmethod
    def add_chunk(self, index: int, data: bytes | memoryview, digest: bytes | None = None) -> None:
        """Chunk `index` (in order), with its BLAKE3-256 `digest` when the caller already
        verified it (thawed chunks are), so it need not be hashed again."""

    @abstractmethod
    def finish(self) -> None:
        """Create the session (raise as `import_session` does)."""

    def abort(self) -> None:  # noqa: B027 - optional hook
        """Drop what was staged (the import failed before `finish`)."""


def feed_import(sink: ImportSink, chunks: Sequence[bytes | memoryview]) -> None:
    """Give `sink` every chunk in order and finish it, aborting it if a chunk is refused: how
    an engine that stages chunk by chunk (`begin_import`) implements `import_session`."""
    try:
        for index, chunk in enumerate(chunks):
            sink.add_chunk(index, chunk)
    except BaseException:
        sink.abort()
        raise
    sink.finish()


class _CollectingSink(ImportSink):
    def __init__(
        self, adapter: EngineAdapter, session_id: str, token_ids: list[int], chunk_tokens: int
    ) -> None:
        self._adapter = adapter
        self._args = (session_id, token_ids, chunk_tokens)
        self._chunks: list[bytes] = []

    def add_chunk(self, index: int, data: bytes | memoryview, digest: bytes | None = None) -> None:
        self._chunks.append(bytes(data))

    def finish(self) -> None:
        session_id, token_ids, chunk_tokens = self._args
        chunks, self._chunks = self._chunks, []
        self._adapter.import_session(session_id, token_ids, chunks, chunk_tokens)

    def abort(self) -> None:
        self._chunks = []


class EngineAdapter(ABC):
    # -- building ------------------------------------------------------------------------

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> EngineAdapter:
        """Build the engine from `cwm agent`'s settings; every engine the factory names
        overrides this. Raise EngineSettingsError when a setting it needs is missing."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from settings")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the engine's resources."""

    # -- identity ------------------------------------------------------------------------

    @property
    @abstractmethod
    def fingerprint(self) -> pb.ModelFingerprint: ...

    @property
    @abstractmethod
    def endpoint(self) -> str: ...

    # -- sessions ------------------------------------------------------------------------

    @abstractmethod
    def sessions(self) -> list[EngineSession]: ...

    # -- KV out and in -------------------------------------------------------------------

    @abstractmethod
    def export_session(self, session_id: str, chunk_tokens: int) -> ExportedKV:
        """Raise cwm_client.errors.NotFound if there is no such session."""

    @abstractmethod
    def import_session(
        self,
        session_id: str,
        token_ids: Sequence[int],
        chunks: Sequence[bytes],
        chunk_tokens: int,
    ) -> None:
        """Raise cwm_client.errors.AlreadyExists if the session id is taken."""

    def begin_import(
        self, session_id: str, token_ids: Sequence[int], chunk_tokens: int
    ) -> ImportSink:
        """An import fed chunk by chunk; by default collected for `import_session`."""
        return _CollectingSink(self, session_id, [int(t) for t in token_ids], chunk_tokens)

    def default_chunk_tokens(self) -> int:
        """The chunk span `cwm agent` uses unless told (`--chunk-tokens`)."""
        return 256

    def new_session_id(self) -> str:
        """The id of a session a thaw creates when the caller names none: 256 random bits
        (a cache_salt only its tenant sees). An engine whose sessions are fixed places
        (llama-server's slots) names a free one instead."""
        return secrets.token_hex(32)

    def request_fields(self, session_id: str) -> dict[str, object]:
        """What every request that continues `session_id` carries besides its prompt, as the
        engine's HTTP API spells it: the cache_salt here, llama-server's slot id there."""
        return {"cache_salt": session_id}
