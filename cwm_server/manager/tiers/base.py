"""The one verb set every tier speaks, so the chunk store treats memory, disk and Redis
alike: `write`, `read`, `contains`, `remove`, all keyed by (tenant, digest).

- `write(tenant, digest, chunk)` keeps a chunk and returns the bytes it occupies there;
- `read(tenant, digest)` gives it back, or None when the tier does not hold it, and raises
  `ChunkCorrupt` when what the tier holds is not a sound chunk;
- `contains(tenant, digests)` says which of several the tier holds, in one round trip
  where the tier is remote;
- `remove(tenant, digests)` drops several at once; absent ones are no error.

The payload differs by tier, the names do not. Disk and Redis keep a `StoredChunk` (encoded,
maybe sealed: the bytes as they rest). Memory keeps a chunk's raw bytes, already decoded and
opened, with the seal taken when they were verified: a hit is worth having only because it
skips the decode, the unsealing and the BLAKE3 check, so the memory tier cannot hold the
stored form.

Nothing below the store trusts or checks what it reads against a digest; the store
(`store.ChunkStore`, the only way in) verifies every chunk it returns.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Generic, TypeVar

Payload = TypeVar("Payload")


class ChunkCorrupt(ValueError):
    """What a tier holds under a chunk's key is not a sound chunk; `why` says what is wrong
    in a few words ("truncated header", "digest mismatch", ...)."""

    def __init__(self, message: str, why: str = "") -> None:
        super().__init__(message)
        self.why = why or message


class ChunkTier(abc.ABC, Generic[Payload]):
    """One tier of the chunk store (see the module docstring for what each verb promises)."""

    @abc.abstractmethod
    def write(self, tenant: str, digest: bytes, chunk: Payload) -> int:
        """Keep `chunk`; the bytes it occupies in this tier (0 if this tier declined it)."""

    @abc.abstractmethod
    def read(self, tenant: str, digest: bytes) -> Payload | None:
        """The chunk, or None if this tier does not hold it; ChunkCorrupt if what it holds
        is not a chunk."""

    @abc.abstractmethod
    def contains(self, tenant: str, digests: Sequence[bytes]) -> set[bytes]:
        """Which of `digests` this tier holds."""

    @abc.abstractmethod
    def remove(self, tenant: str, digests: Sequence[bytes]) -> None:
        """Drop these chunks (those it does not hold are skipped)."""
