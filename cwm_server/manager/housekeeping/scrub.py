"""The scrubber: every `interval_s` seconds, read and verify every chunk file at a bounded
rate, so that corruption is found (and quarantined, `tiers.quarantine`) while a backup that
heals it still exists, not on the day a thaw needs the chunk.

Each chunk is read, decoded and checked against its digest on an I/O thread
(`ChunkStore.check_disk_copy`), one at a time, with sleeps that hold the pass to
`mib_per_s`: a pass costs the disk a fraction of its bandwidth and the manager one I/O
thread at a time. A file found corrupt is quarantined exactly as a thaw that found it would
quarantine it: FindMissingChunks lists it, and the next freeze or import of its bytes repairs
every window that shares it. Chunks sealed with a key this manager lacks are skipped.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable

import structlog

from cwm_client.errors import CwmError
from cwm_server.manager.housekeeping.periodic import Periodic
from cwm_server.manager.tiers.base import ChunkCorrupt
from cwm_server.manager.tiers.disk import DiskTier
from cwm_server.manager.tiers.store import ChunkStore

log = structlog.get_logger("cwm.scrub")

DEFAULT_MIB_PER_S = 64.0


class Scrubber:
    def __init__(
        self,
        store: ChunkStore,
        disk: DiskTier,
        run_io: Callable[..., Awaitable[str]],
        interval_s: float,
        mib_per_s: float = DEFAULT_MIB_PER_S,
    ) -> None:
        self._store = store
        self._disk = disk
        self._io = run_io  # Executors.io
        self.interval_s = interval_s
        self.mib_per_s = mib_per_s
        self.passes = 0
        self.verified = 0
        self.found_corrupt = 0
        self._periodic = Periodic(interval_s, self.scrub, log, "scrub_failed")

    async def scrub(self) -> int:
        """One pass over every chunk file; returns how many were found corrupt."""
        budget = self.mib_per_s * (1 << 20)
        corrupt = 0
        started = time.monotonic()
        read = 0
        for tenant, digest, path in list(self._disk.iter_chunks()):
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                continue  # collected meanwhile
            why = await self._io(self._check, tenant, digest)
            self.verified += 1
            if why:
                corrupt += 1
                assert self._store.quarantine is not None
                self._store.quarantine.move(path, tenant, digest, f"scrub: {why}")
                self._store.observer.corrupt("disk")
            read += size
            ahead = read / budget - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)
        self.passes += 1
        self.found_corrupt += corrupt
        log.info("scrub_pass", verified=self.verified, corrupt=corrupt)
        return corrupt

    def _check(self, tenant: str, digest: bytes) -> str:
        """Why the chunk's file is unsound ("" if it is, or cannot be judged here)."""
        try:
            self._store.check_disk_copy(tenant, digest)
        except ChunkCorrupt as exc:
            return exc.why
        except CwmError:  # sealed with a key this manager does not hold
            return ""
        except OSError:
            return ""  # gone, or unreadable for now: the next pass looks again
        return ""

    def start(self) -> None:
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()
