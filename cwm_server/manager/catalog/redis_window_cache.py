"""The Redis catalog's memory of recent windows, so thaws go on while Redis is away."""

from __future__ import annotations

import threading
from collections import OrderedDict


class WindowCache:
    """The FULL views this manager committed or read lately, by bytes: what `get_window`
    answers while Redis is unreachable, so thaws of windows whose chunks the local tiers
    hold keep working (a window deleted through another manager meanwhile may be served:
    windows are immutable, only their deletion goes unseen)."""

    def __init__(self, capacity_bytes: int) -> None:
        self._capacity = capacity_bytes
        self._items: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, tenant: str, name: str, blob: bytes) -> None:
        if len(blob) > self._capacity:
            return
        with self._lock:
            self._discard((tenant, name))
            self._items[(tenant, name)] = blob
            self._bytes += len(blob)
            while self._bytes > self._capacity:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)

    def get(self, tenant: str, name: str) -> bytes | None:
        with self._lock:
            blob = self._items.get((tenant, name))
            if blob is not None:
                self._items.move_to_end((tenant, name))
            return blob

    def discard(self, tenant: str, name: str) -> None:
        with self._lock:
            self._discard((tenant, name))

    def _discard(self, key: tuple[str, str]) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= len(old)
