"""The hot tier: a byte-capped LRU of raw chunk bytes that were verified when they entered."""

from __future__ import annotations

import threading
from collections import OrderedDict

ChunkKey = tuple[str, bytes]


class MemoryTier:
    def __init__(self, capacity_bytes: int) -> None:
        self._capacity = capacity_bytes
        self._items: OrderedDict[ChunkKey, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0
        """Chunks dropped to make room (a metric; see cwm_server.manager.metrics)."""

    @property
    def held_bytes(self) -> int:
        return self._bytes

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: ChunkKey) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: ChunkKey, raw: bytes) -> None:
        if len(raw) > self._capacity:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = raw
            self._bytes += len(raw)
            while self._bytes > self._capacity:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= len(evicted)
                self.evictions += 1

    def discard(self, key: ChunkKey) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
