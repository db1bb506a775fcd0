"""The TTL collector: every `interval_s` seconds, delete the windows whose time is up.

A window with a TTL stops being visible the moment it expires (the catalog filters it out
of every read), so the collector decides nothing about visibility: it frees the space.
It deletes through the same path as DeleteWindow (`WindowManager.expire`: one catalog
transaction drops the window and its chunk references, then files no window uses are
unlinked unless a live stream pins them), so a chunk that a clone or another window still
uses survives. Pinned windows never expire (the catalog stores no expiry for them).

A sweep takes at most `batch` windows per catalog call and keeps going while whole
batches come back, so a backlog drains in one sweep without holding the catalog thread for
long at a time (each deletion is its own short transaction between other calls).
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from cwm_server.manager.windows.manager import WindowManager

log = structlog.get_logger("cwm.ttl")

DEFAULT_BATCH = 100


class TtlCollector:
    def __init__(
        self, manager: WindowManager, interval_s: float, batch: int = DEFAULT_BATCH
    ) -> None:
        self.manager = manager
        self.interval_s = interval_s
        self.batch = max(1, batch)
        self.expired_total = 0
        """Windows this collector has deleted since it started."""
        self.sweeps = 0
        self._task: asyncio.Task[None] | None = None

    async def sweep(self) -> int:
        """Delete every window expired by now; returns how many were deleted."""
        deleted = 0
        while True:
            count = await self.manager.collect_expired(limit=self.batch)
            deleted += count
            if count < self.batch:
                break
        self.sweeps += 1
        self.expired_total += deleted
        if deleted:
            log.info("ttl_sweep", expired=deleted)
        return deleted

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:  # the next sweep tries again
                log.exception("ttl_sweep_failed")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self.run_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
