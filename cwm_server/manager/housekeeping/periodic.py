"""A piece of housekeeping run every `interval_s` seconds on the event loop until stopped;
a run that fails is logged and the next one tries again (the TTL collector, the scrubber)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any


class Periodic:
    def __init__(
        self, interval_s: float, work: Callable[[], Awaitable[object]], log: Any, failed: str
    ) -> None:
        """`failed`: the event `log` records, with the traceback, when a run fails."""
        self.interval_s = interval_s
        self._work = work
        self._log = log
        self._failed = failed
        self._task: asyncio.Task[None] | None = None

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self._work()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - logged; the next run tries again
                self._log.exception(self._failed)

    def start(self) -> None:
        """Start running (not at all with an interval of 0 or less)."""
        if self._task is None and self.interval_s > 0:
            self._task = asyncio.ensure_future(self.run_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
