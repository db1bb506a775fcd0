"""The contract between the host agent and an engine.

Every engine cwm can freeze and thaw (the reference HF-transformers engine, vLLM through its
KV connector) is one sibling module implementing `EngineAdapter`. The agent only ever uses
these primitives:

- `fingerprint`: what model/engine produced the KV; thaw refuses a window whose fingerprint
  differs, so KV never lands in an engine that would misread it.
- `endpoint`: where clients send OpenAI-style requests that continue a session.
- `sessions()`: the live sessions (id = cache_salt, token count, last activity), reported to
  the manager and watched by the auto-freeze policy.
- `export_session(session_id, chunk_tokens)`: the exact token ids whose KV the session holds
  and that KV as canonical chunks ([2, L, tokens, H*D], K then V, little-endian, the
  fingerprint's dtype). The bytes of a token span never change once computed, so a re-export
  of a grown session repeats the old full chunks byte for byte (incremental freeze).
- `import_session(session_id, token_ids, chunks, chunk_tokens)`: create a session holding
  exactly that KV, so the next request whose prompt extends `token_ids` computes only the
  new tokens and gives bit-identical results.
- `close()`: release the engine.

Adapters are called from worker threads (engines block); they do their own locking.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from cwm_client import pb


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
    @property
    @abstractmethod
    def fingerprint(self) -> pb.ModelFingerprint: ...

    @property
    @abstractmethod
    def endpoint(self) -> str: ...

    @abstractmethod
    def sessions(self) -> list[EngineSession]: ...

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

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the engine's resources."""
