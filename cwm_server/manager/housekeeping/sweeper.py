"""The periodic sweeps of a collector, each on its own schedule, started beside the TTL
collector.

A collection that could not finish (Redis away or refusing when a delete freed chunks; a
manager that died between claiming chunks and deleting them; a delete whose reply was lost)
leaves work behind; the collector knows how to finish it and declares each kind as a
`Sweep`; the sweeper runs them. A sweep that needs Redis runs only while the link to Redis
is up, and runs at once when the link comes back, so Redis copies left behind go soon after
Redis does. The health checks only report; no sweep runs from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from cwm_server.manager.tiers.redis_link import RedisLink

log = structlog.get_logger("cwm.sweeper")

CLAIM_SWEEP_EVERY_S = 10.0
"""Fleet mode: how often to finish collections whose claims went stale and retry this
manager's collections that could not claim their chunks."""
ORPHAN_SWEEP_EVERY_S = 900.0
"""Fleet mode: how often to look for chunks in Redis that no window references (a SCAN of
every chunk key; see `collector.SharedCollector.sweep_orphan_chunks`)."""
REDIS_DELETES_EVERY_S = 5.0
"""Local catalog with a Redis tier: how often to retry deleting Redis copies of collected
chunks while some are pending."""


def _always() -> bool:
    return True


@dataclass(frozen=True)
class Sweep:
    """One kind of left-behind work and how often to look for it."""

    name: str
    every_s: float
    run: Callable[[], Awaitable[int]]
    """Does one sweep; returns how many chunks it collected."""
    first_after_s: float = 0.0
    """Delay before the first run (0: as soon as the sweeper starts)."""
    wanted: Callable[[], bool] = _always
    """Cheap check before each run: whether there is anything to do."""
    needs_redis: bool = True
    """Runs only while the link to Redis is up (the work is in Redis)."""
    soon_after_redis_returns: bool = False
    """Runs at once when the link to Redis comes back (work Redis's absence left)."""


class Sweeper:
    def __init__(self, sweeps: list[Sweep], link: RedisLink | None) -> None:
        self.sweeps = sweeps
        self._link = link
        self._tasks: list[asyncio.Task[None]] = []
        self._wake: dict[str, asyncio.Event] = {}
        self._listener: Callable[[bool, str], None] | None = None
        self.runs: dict[str, int] = {sweep.name: 0 for sweep in sweeps}
        """How many times each sweep has run since the sweeper started."""

    def start(self) -> None:
        """Start every sweep's schedule (on the running event loop)."""
        if self._tasks or not self.sweeps:
            return
        loop = asyncio.get_running_loop()
        for sweep in self.sweeps:
            self._wake[sweep.name] = asyncio.Event()
            self._tasks.append(loop.create_task(self._run_forever(sweep)))
        if self._link is not None:
            self._listener = self._link_changed(loop)
            self._link.listeners.append(self._listener)

    async def stop(self) -> None:
        if self._link is not None and self._listener is not None:
            self._link.listeners.remove(self._listener)
            self._listener = None
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def wake(self) -> None:
        """Run the sweeps that wait for Redis's return now rather than at their next time.
        On the event loop."""
        for sweep in self.sweeps:
            event = self._wake.get(sweep.name)
            if sweep.soon_after_redis_returns and event is not None:
                event.set()

    def _link_changed(self, loop: asyncio.AbstractEventLoop) -> Callable[[bool, str], None]:
        def changed(up: bool, detail: str) -> None:  # called on whichever thread saw it
            if up:
                loop.call_soon_threadsafe(self.wake)

        return changed

    def _may_run(self, sweep: Sweep) -> bool:
        if sweep.needs_redis and self._link is not None and not self._link.up:
            return False  # the health check's ping finds it back, and wakes us
        return sweep.wanted()

    async def _run_forever(self, sweep: Sweep) -> None:
        wake = self._wake[sweep.name]
        delay = sweep.first_after_s
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await wake.wait()
            wake.clear()
            started = time.monotonic()
            if self._may_run(sweep):
                try:
                    await sweep.run()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the next run tries again
                    log.warning("sweep_failed", sweep=sweep.name, detail=str(exc))
                self.runs[sweep.name] += 1
            delay = max(0.0, sweep.every_s - (time.monotonic() - started))
