"""The hot tier: a byte-capped LRU of raw chunk bytes that were verified when they entered.

Only bytes already checked against their BLAKE3 digest may be written here (a freeze's
received chunk, a disk or Redis read). Each entry keeps an XXH3-128 seal of its bytes taken
at `write`, and `read` checks it, so a memory hit is verified too: bytes that changed after
their BLAKE3 check (a bit flip, a stray write) are dropped and reported as a miss, and the
read falls through to the tiers below and their BLAKE3 check. The seal costs a fraction of
BLAKE3 (measured in docs/BENCHMARKS.md), which matters on a thaw from memory, where the
check is most of the manager's work. It needs no cryptographic strength: BLAKE3 already
proved the bytes are the chunk their digest names; the seal proves only that they have not
changed since.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import xxhash

from cwm_server.manager.tiers.base import ChunkTier

ChunkKey = tuple[str, bytes]

seal_of = xxhash.xxh3_128_intdigest
"""The seal of a chunk's bytes: take it right after their BLAKE3 check and hand it to
`write`, so bytes that change between the check and the write are caught too."""


class MemoryTier(ChunkTier[bytes]):
    """Raw bytes by (tenant, digest); see tiers.base for why its payload is raw bytes."""

    def __init__(self, capacity_bytes: int) -> None:
        self._capacity = capacity_bytes
        self._items: OrderedDict[ChunkKey, tuple[bytes, int]] = OrderedDict()
        self._bytes = 0
        self._reserved = 0
        """Bytes of chunks in flight (received, not yet stored) counted against the cap,
        so that the hot tier and the staging of transfers together stay within it."""
        self._lock = threading.Lock()
        self.evictions = 0
        """Chunks dropped to make room (a metric; see cwm_server.manager.metrics)."""
        self.corrupt = 0
        """Entries whose bytes no longer matched their seal, dropped (a metric)."""

    @property
    def held_bytes(self) -> int:
        return self._bytes

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return len(self._items)

    def read(self, tenant: str, digest: bytes) -> bytes | None:
        """The entry's bytes if they still match their seal; None if absent or changed
        (a changed entry is dropped). The seal is checked outside the lock."""
        key = (tenant, digest)
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                return None
            self._items.move_to_end(key)
        raw, seal = entry
        if seal_of(raw) == seal:
            return raw
        with self._lock:
            if self._items.get(key) is entry:
                del self._items[key]
                self._bytes -= len(raw)
                self.corrupt += 1
        return None

    def seal_for(self, raw: bytes) -> int | None:
        """`seal_of(raw)`, or None where this tier would not keep `raw` (larger than it)."""
        return seal_of(raw) if len(raw) <= self._capacity else None

    def write(self, tenant: str, digest: bytes, chunk: bytes, seal: int | None = None) -> int:
        """Keep `chunk`, raw bytes the caller has verified against `digest`; `seal` is
        `seal_of(chunk)` taken right after that check (taken here if None). Returns the
        bytes held for it: 0 if it is larger than the whole tier."""
        size = len(chunk)
        if size > self._capacity:
            return 0
        entry = (chunk, seal_of(chunk) if seal is None else seal)
        key = (tenant, digest)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old[0])
            self._items[key] = entry
            self._bytes += size
            self._evict_beyond(self._capacity)
        return size

    def reserve(self, size: int) -> int:
        """Count `size` bytes of a chunk in flight against the cap, making room for them
        now (the least recently used entries go); returns what was reserved, to `release`
        once the chunk was stored or dropped (0 for a chunk larger than the tier)."""
        if size > self._capacity:
            return 0
        with self._lock:
            self._reserved += size
            self._evict_beyond(self._capacity)
        return size

    def release(self, reserved: int) -> None:
        with self._lock:
            self._reserved -= reserved

    @property
    def reserved_bytes(self) -> int:
        return self._reserved

    def _evict_beyond(self, limit: int) -> None:
        """Drop entries, oldest first, until entries and reservations fit `limit` (or no
        entry is left: reservations alone may exceed it). Holds the lock."""
        while self._items and self._bytes + self._reserved > limit:
            _, (evicted, _) = self._items.popitem(last=False)
            self._bytes -= len(evicted)
            self.evictions += 1

    def contains(self, tenant: str, digests: Sequence[bytes]) -> set[bytes]:
        """Which of `digests` have an entry (their seals are checked when read, not here)."""
        with self._lock:
            return {digest for digest in digests if (tenant, digest) in self._items}

    def remove(self, tenant: str, digests: Sequence[bytes]) -> None:
        with self._lock:
            for digest in digests:
                old = self._items.pop((tenant, digest), None)
                if old is not None:
                    self._bytes -= len(old[0])
