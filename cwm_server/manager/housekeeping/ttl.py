"""The TTL collector: every `interval_s` seconds, delete the windows whose time is up.

A window with a TTL stops being visible the moment it expires (the catalog filters it out
of every read), so the collector decides nothing about visibility: it frees the space.
It deletes through the same path as DeleteWindow (`Expiry.expire`: one catalog transaction
drops the window and its chunk references, then the collector removes chunks no window
uses unless a live stream pins them), so a chunk that a clone or another window still uses
survives. Pinned windows never expire (the catalog stores no expiry for them). A quota
check that would refuse a call first collects its tenant's expired windows
(`Expiry.after_collecting_expired`), so an expired window never holds quota a caller needs.

A sweep takes at most `batch` windows per catalog call and keeps going while whole
batches come back, so a backlog drains in one sweep without holding the catalog thread for
long at a time (each deletion is its own short transaction between other calls).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from cwm_client.errors import ResourceExhausted
from cwm_server.manager.catalog.base import WindowCatalog
from cwm_server.manager.executors import Executors
from cwm_server.manager.housekeeping.collector import Collector
from cwm_server.manager.housekeeping.periodic import Periodic

T = TypeVar("T")
log = structlog.get_logger("cwm.ttl")

DEFAULT_BATCH = 100


class Expiry:
    """Deleting windows whose time is up, through the delete path."""

    def __init__(self, catalog: WindowCatalog, executors: Executors, collector: Collector) -> None:
        self._catalog = catalog
        self._executors = executors
        self._collector = collector

    async def expire(self, tenant: str, name: str, now: float) -> int | None:
        """Delete a window that expired at or before `now` (its chunks no other window
        uses are collected); returns the chunks freed, or None if it was not (or no
        longer) expired."""
        freed = await self._executors.db(self._catalog.delete_expired_window, tenant, name, now)
        if freed is None:
            return None
        removed = await self._collector.collect(tenant, [d for d, _ in freed])
        log.info("expired", tenant=tenant, window=name, chunks_freed=len(freed), unlinked=removed)
        return len(freed)

    async def collect_expired(self, tenant: str | None = None, limit: int = 1000) -> int:
        """Delete windows that have expired (only `tenant`'s, if given); returns how many.
        The TTL collector calls it every interval; a quota check calls it for its tenant
        before it refuses."""
        now = time.time()
        expired = await self._executors.db(self._catalog.expired_windows, now, limit, tenant)
        count = 0
        for owner, name in expired:
            if tenant is not None and owner != tenant:
                continue  # a catalog asked for one tenant returns only its windows
            if await self.expire(owner, name, now) is not None:
                count += 1
        return count

    async def after_collecting_expired(self, tenant: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt()`; if a quota refuses it (RESOURCE_EXHAUSTED), delete the tenant's
        expired windows and try once more: an expired window must not hold quota that a
        caller needs, yet collecting on every call would cost a catalog scan each time."""
        try:
            return await attempt()
        except ResourceExhausted:
            if not await self.collect_expired(tenant):
                raise
            return await attempt()


class TtlCollector:
    """Runs `Expiry.collect_expired` for every tenant every `interval_s` seconds."""

    def __init__(self, expiry: Expiry, interval_s: float, batch: int = DEFAULT_BATCH) -> None:
        self.expiry = expiry
        self.interval_s = interval_s
        self.batch = max(1, batch)
        self.expired_total = 0
        """Windows this collector has deleted since it started."""
        self.sweeps = 0
        self._periodic = Periodic(interval_s, self.sweep, log, "ttl_sweep_failed")

    async def sweep(self) -> int:
        """Delete every window expired by now; returns how many were deleted."""
        deleted = 0
        while True:
            count = await self.expiry.collect_expired(limit=self.batch)
            deleted += count
            if count < self.batch:
                break
        self.sweeps += 1
        self.expired_total += deleted
        if deleted:
            log.info("ttl_sweep", expired=deleted)
        return deleted

    def start(self) -> None:
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()
