"""The hot tier: a byte-capped LRU of raw chunk bytes that were verified when they entered.

Only bytes already checked against their BLAKE3 digest may be put here (a freeze's received
chunk, a disk or Redis read). Each entry keeps an XXH3-128 seal of its bytes taken at `put`,
and `get` checks it, so a memory hit is verified too: bytes that changed after their BLAKE3
check (a bit flip, a stray write) are dropped and reported as a miss, and the read falls
through to the tiers below and their BLAKE3 check. The seal costs about a fifth of BLAKE3
(34 vs 165 us per MiB on the benchmark machine, docs/BENCHMARKS.md), which was a quarter of
the manager's CPU on a thaw from memory. It needs no cryptographic strength: BLAKE3 already
proved the bytes are the chunk their digest names; the seal proves only that they have not
changed since.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import xxhash

ChunkKey = tuple[str, bytes]

seal_of = xxhash.xxh3_128_intdigest
"""The seal of a chunk's bytes: take it right after their BLAKE3 check and hand it to `put`,
so bytes that change between the check and the put are caught too."""


class MemoryTier:
    def __init__(self, capacity_bytes: int) -> None:
        self._capacity = capacity_bytes
        self._items: OrderedDict[ChunkKey, tuple[bytes, int]] = OrderedDict()
        self._bytes = 0
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

    def get(self, key: ChunkKey) -> bytes | None:
        """The entry's bytes if they still match their seal; None if absent or changed
        (a changed entry is dropped). The seal is checked outside the lock."""
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

    def put(self, key: ChunkKey, raw: bytes, seal: int | None = None) -> None:
        """Keep `raw`, which the caller has verified against the key's digest; `seal` is
        `seal_of(raw)` taken right after that check (taken here if None)."""
        if len(raw) > self._capacity:
            return
        entry = (raw, seal_of(raw) if seal is None else seal)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old[0])
            self._items[key] = entry
            self._bytes += len(raw)
            while self._bytes > self._capacity:
                _, (evicted, _) = self._items.popitem(last=False)
                self._bytes -= len(evicted)
                self.evictions += 1

    def discard(self, key: ChunkKey) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old[0])
