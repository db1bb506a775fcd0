"""The contract between the host agent and an engine.

Every engine cwm can freeze and thaw (the reference HF-transformers engine, vLLM through its
KV connector) is one sibling folder whose adapter implements `EngineAdapter`; `factory` finds
an adapter by the engine's name. The agent only ever uses these primitives, grouped by role:

- building (`from_settings`, `close`): the factory builds an engine from what `cwm agent` was
  told (`EngineSettings`) and the agent releases it when it stops.
- identity (`fingerprint`, `endpoint`): what model/engine produced the KV, so thaw refuses a
  window whose fingerprint differs and KV never lands in an engine that would misread it; and
  where clients send OpenAI-style requests that continue a session.
- sessions (`sessions()`): the live sessions (id = cache_salt, token count, last activity),
  reported to the manager and watched by the auto-freeze policy.
- KV out and in:
  * `export_session(session_id, chunk_tokens)`: the exact token ids whose KV the session
    holds and that KV as canonical chunks ([2, L, tokens, H*D], K then V, little-endian, the
    fingerprint's dtype). The bytes of a token span never change once computed, so a
    re-export of a grown session repeats the old full chunks byte for byte (incremental
    freeze).
  * `import_session(session_id, token_ids, chunks, chunk_tokens)`: create a session holding
    exactly that KV, so the next request whose prompt extends `token_ids` computes only the
    new tokens and gives bit-identical results.

Adapters are called from worker threads (engines block); they do their own locking.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
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
