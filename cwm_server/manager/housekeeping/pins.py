"""Pins: a chunk a live stream depends on is not collected until the stream lets go.

A freeze pins the chunks it declares, a thaw the chunks it streams, an upload those it
holds. A collection that meets a pinned chunk skips it and remembers it (*defers* it); when
the last pin on it goes, the chunk is collected then (if it still has no catalog row: the
collection checks). This holds with either catalog: a restart sweeps only local files,
never Redis copies, and a manager may run for months, so a deferred chunk must not wait
for the next start.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable

import structlog

log = structlog.get_logger("cwm.pins")

PinKey = tuple[str, bytes]
"""(tenant, digest)."""


class PinTable:
    def __init__(self, collect: Callable[[str, list[bytes]], Awaitable[int]]) -> None:
        """`collect(tenant, digests)`: what runs, on the event loop, for deferred chunks
        whose last pin went."""
        self._collect = collect
        self._pins: Counter[PinKey] = Counter()
        self._deferred: set[PinKey] = set()
        self._lock = threading.Lock()
        """Guards `_pins` and `_deferred`: pins change on the event loop, collections
        check them on the catalog thread."""
        self._tasks: set[asyncio.Future[int]] = set()

    def pin(self, tenant: str, digests: Iterable[bytes]) -> list[PinKey]:
        """Pin each distinct digest once; returns the keys to hand to `unpin`."""
        keys = [(tenant, d) for d in set(digests)]
        with self._lock:
            self._pins.update(keys)
        return keys

    def unpin(self, keys: Iterable[PinKey]) -> None:
        """Drop pins; a chunk a collection deferred while pinned is collected now."""
        due: dict[str, list[bytes]] = {}
        with self._lock:
            for key in keys:
                self._pins[key] -= 1
                if self._pins[key] <= 0:
                    del self._pins[key]
                    if key in self._deferred:
                        self._deferred.discard(key)
                        due.setdefault(key[0], []).append(key[1])
        if not due:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # closing, off the loop: start-up recovery collects the files
            log.info("deferred_collect_skipped", chunks=sum(len(d) for d in due.values()))
            return
        for tenant, digests in due.items():
            task = asyncio.ensure_future(self._collect(tenant, digests))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def is_pinned(self, tenant: str, digest: bytes) -> bool:
        return self._pins.get((tenant, digest), 0) > 0

    def defer_if_pinned(self, tenant: str, digest: bytes) -> bool:
        """True (and remembered for the last unpin) if a live stream pins the chunk."""
        with self._lock:
            if self._pins.get((tenant, digest), 0) > 0:
                self._deferred.add((tenant, digest))
                return True
            return False

    def held(self) -> dict[PinKey, int]:
        """A copy of the pins held now and how many streams hold each."""
        with self._lock:
            return dict(self._pins)

    def deferred(self) -> set[PinKey]:
        """A copy of the chunks waiting for their last pin to go before collection."""
        with self._lock:
            return set(self._deferred)
