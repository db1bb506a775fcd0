"""Collection: chunks that no catalog row references leave every tier.

Two strategies, one per catalog, chosen once when the manager starts
(`backend.open_backend`):

- `LocalCollector`, beside this manager's own SQLite catalog: a chunk without a row is
  removed at once from memory and disk; its Redis copy (with a Redis tier) too, or, if
  Redis is away or refusing, its digest is listed in the catalog until the sweeper finds
  Redis again (`retry_redis_deletes`).
- `SharedCollector`, beside the fleet's Redis catalog: a chunk is first *claimed* (so no
  commit through any manager can take it meanwhile), then its bytes are deleted
  everywhere, then the claim is released (see `catalog.redis`). A claim that could not be
  made, one a manager left half-done, and bytes no delete ever learnt of are finished by
  the sweeps (`sweep_stale_claims`, `sweep_orphan_chunks`).

Both skip a chunk a live stream pins and collect it when its last pin goes (`pins`). Redis
trouble never fails a collection: the rows are gone already and the caller's change has
committed, so what cannot be cleaned now is logged and cleaned later.
"""

from __future__ import annotations

import abc
import asyncio
import sqlite3
import threading
import time
from collections.abc import Iterable

import structlog

from cwm_client.errors import CwmError
from cwm_server.manager.catalog.redis import RedisCatalog
from cwm_server.manager.catalog.sqlite import SqliteCatalog
from cwm_server.manager.executors import Executors
from cwm_server.manager.housekeeping import sweeper
from cwm_server.manager.housekeeping.pins import PinKey, PinTable
from cwm_server.manager.housekeeping.sweeper import Sweep
from cwm_server.manager.tiers.store import ChunkStore

log = structlog.get_logger("cwm.collector")

ORPHAN_GRACE_S = 3600.0
"""Fleet mode: how long a chunk in Redis must stay without a catalog row (seen so by two
orphan sweeps this far apart) before the sweep collects it. Longer than any freeze or
upload keeps chunks uncommitted (`upload_ttl_s` is 600 s by default); one that takes
longer still is safe, only slower: its commit re-sends (or asks for) the chunk."""


class Collector(abc.ABC):
    def __init__(self, store: ChunkStore, pins: PinTable, executors: Executors) -> None:
        self.store = store
        self.pins = pins
        self.executors = executors

    async def collect(self, tenant: str, digests: Iterable[bytes]) -> int:
        """Remove chunks with no catalog row from every tier, unless a live stream pins
        them (then when its last pin goes). Returns how many were collected now."""
        digests = list(dict.fromkeys(digests))
        candidates = [d for d in digests if not self.pins.defer_if_pinned(tenant, d)]
        if not candidates:
            return 0
        return await self.executors.db(self.collect_unreferenced, tenant, candidates)

    @abc.abstractmethod
    def collect_unreferenced(self, tenant: str, digests: list[bytes]) -> int:
        """`collect`'s work, on the catalog thread (so no commit interleaves between a row
        check and a removal); pins are checked again here, as a stream may have pinned a
        chunk since `collect` looked."""

    @abc.abstractmethod
    def orphan_file_removed(self, tenant: str, digest: bytes) -> None:
        """Start-up recovery removed a chunk file no window commits: clean what else that
        chunk may have left (its Redis copy)."""

    @abc.abstractmethod
    def sweeps(self) -> list[Sweep]:
        """The periodic work this collection leaves behind, for the sweeper."""


class LocalCollector(Collector):
    """Collection beside this manager's own SQLite catalog (see the module docstring)."""

    def __init__(
        self, catalog: SqliteCatalog, store: ChunkStore, pins: PinTable, executors: Executors
    ) -> None:
        super().__init__(store, pins, executors)
        self.catalog = catalog
        self.redis_deletes_pending = store.has_redis
        """Whether the catalog may list Redis copies still to delete (unknown at start,
        so True with a Redis tier)."""

    def collect_unreferenced(self, tenant: str, digests: list[bytes]) -> int:
        """Chunk by chunk: one that fails does not strand the rest."""
        unreferenced: list[bytes] = []
        for digest in digests:
            if self.pins.defer_if_pinned(tenant, digest) or self.catalog.chunk(tenant, digest):
                continue
            unreferenced.append(digest)
            try:
                self.store.remove_local(tenant, digest)
            except OSError as exc:  # start-up recovery removes the file
                log.warning(
                    "collect_failed", tenant=tenant, digest=digest.hex()[:16], detail=str(exc)
                )
        if unreferenced and self.store.has_redis:
            self._remove_redis_copies(tenant, unreferenced)
        return len(unreferenced)

    def orphan_file_removed(self, tenant: str, digest: bytes) -> None:
        if self.store.has_redis:
            # Its Redis copy (a stream that never committed wrote it too): deleted once
            # Redis answers (`retry_redis_deletes`).
            self.catalog.add_redis_pending(tenant, [digest])

    def sweeps(self) -> list[Sweep]:
        if not self.store.has_redis:
            return []
        return [
            Sweep(
                "redis_deletes",
                sweeper.REDIS_DELETES_EVERY_S,
                lambda: self.executors.db(self.retry_redis_deletes),
                wanted=lambda: self.redis_deletes_pending,
                soon_after_redis_returns=True,
            )
        ]

    def _remove_redis_copies(self, tenant: str, digests: list[bytes]) -> None:
        """Delete Redis copies of collected chunks; if Redis is away (or refuses), list them
        in the catalog for `retry_redis_deletes` instead of failing the caller."""
        try:
            self.store.remove_from_redis(tenant, digests)
            return
        except CwmError as exc:
            log.warning(
                "redis_delete_pending",
                tenant=tenant,
                chunks=len(digests),
                reason=exc.reason,
                detail=str(exc),
            )
        try:
            self.catalog.add_redis_pending(tenant, digests)
            self.redis_deletes_pending = True
        except sqlite3.Error as exc:  # the copies stay in Redis: say so
            log.error("redis_delete_lost", tenant=tenant, chunks=len(digests), detail=str(exc))

    def retry_redis_deletes(self, batch: int = 1000) -> int:
        """Delete Redis copies listed as pending (see `_remove_redis_copies`), unless the
        chunk has a catalog row again (its copy is then the chunk's) or a stream pins it
        (next time). On the catalog thread; raises UNAVAILABLE if Redis is away again (the
        rows stay). Returns copies deleted."""
        catalog = self.catalog
        if not self.store.has_redis or not self.redis_deletes_pending:
            return 0
        pending = catalog.redis_pending(batch)
        by_tenant: dict[str, list[bytes]] = {}
        settled: dict[str, list[PinKey]] = {}
        skipped = 0
        for tenant, digest in pending:
            if self.pins.is_pinned(tenant, digest):
                skipped += 1
                continue
            settled.setdefault(tenant, []).append((tenant, digest))
            if catalog.chunk(tenant, digest) is None:
                by_tenant.setdefault(tenant, []).append(digest)
        deleted = 0
        for tenant, items in settled.items():
            digests = by_tenant.get(tenant, [])
            if digests:
                self.store.remove_from_redis(tenant, digests)
                deleted += len(digests)
            catalog.drop_redis_pending(items)
        if len(pending) < batch and not skipped:
            self.redis_deletes_pending = False
        if deleted:
            log.info("redis_deletes_done", chunks=deleted)
        return deleted


class SharedCollector(Collector):
    """Collection beside the fleet's Redis catalog, through claims (module docstring)."""

    def __init__(
        self, catalog: RedisCatalog, store: ChunkStore, pins: PinTable, executors: Executors
    ) -> None:
        super().__init__(store, pins, executors)
        self.catalog = catalog
        self._lock = threading.Lock()
        self._unclaimed: set[PinKey] = set()
        """Chunks freed by a delete whose collection could not claim them (Redis away or
        refusing); `sweep_stale_claims` tries them again. Guarded by `_lock`."""
        self._orphans_seen: dict[PinKey, float] = {}
        """Chunks in Redis without a catalog row, and when a sweep first saw them so."""

    def unclaimed(self) -> set[PinKey]:
        """A copy of the chunks waiting for a claim that failed to be retried."""
        with self._lock:
            return set(self._unclaimed)

    def collect_unreferenced(self, tenant: str, digests: list[bytes]) -> int:
        return self._claim_and_remove(tenant, digests, check_pins=True)

    def orphan_file_removed(self, tenant: str, digest: bytes) -> None:
        """Nothing more: the chunk's bytes in Redis are the fleet's (another manager's
        commit may count on them); the orphan sweep collects them if no row ever comes."""

    def sweeps(self) -> list[Sweep]:
        return [
            Sweep(
                "stale_claims",
                sweeper.CLAIM_SWEEP_EVERY_S,
                lambda: self.executors.db(self.sweep_stale_claims),
                soon_after_redis_returns=True,
            ),
            # A thread of its own: it touches only Redis, and a SCAN of every chunk key
            # must not hold the catalog thread.
            Sweep(
                "orphan_chunks",
                sweeper.ORPHAN_SWEEP_EVERY_S,
                lambda: asyncio.to_thread(self.sweep_orphan_chunks),
                first_after_s=sweeper.ORPHAN_SWEEP_EVERY_S,
            ),
        ]

    def _claim_and_remove(self, tenant: str, digests: list[bytes], check_pins: bool) -> int:
        """Claim the chunks no window references (so no commit can take them meanwhile),
        delete their bytes everywhere, release the claims. A claim left by a failure is
        redone by any manager; a claim that could not be made is retried by this manager's
        sweep."""
        if check_pins:
            digests = [d for d in digests if not self.pins.defer_if_pinned(tenant, d)]
        claimed: list[bytes] = []
        try:
            claimed = self.catalog.claim_unreferenced(tenant, digests)
            for digest in claimed:
                self.store.remove(tenant, digest)
            self.catalog.release_claims(tenant, claimed)
        except CwmError as exc:
            if not claimed:
                with self._lock:
                    self._unclaimed.update((tenant, d) for d in digests)
            log.warning(
                "collect_deferred",
                tenant=tenant,
                chunks=len(digests),
                reason=exc.reason,
                detail=str(exc),
            )
            return 0
        return len(claimed)

    def sweep_stale_claims(self) -> int:
        """Finish collections that a manager left half-done (it died or lost Redis between
        claiming chunks and releasing them), and retry this manager's collections that
        could not claim their chunks. On the catalog thread."""
        done = 0
        with self._lock:
            unclaimed, self._unclaimed = self._unclaimed, set()
        retry: dict[str, list[bytes]] = {}
        for tenant, digest in unclaimed:
            retry.setdefault(tenant, []).append(digest)
        for tenant, digests in retry.items():
            done += self._claim_and_remove(tenant, digests, check_pins=True)
        for tenant in self.catalog.all_tenants():
            stale = self.catalog.stale_claims(tenant)
            if stale:
                done += self._claim_and_remove(tenant, stale, check_pins=False)
        return done

    def sweep_orphan_chunks(self) -> int:
        """Collect chunks whose bytes are in Redis but that no catalog row has referenced
        for `ORPHAN_GRACE_S` (a delete whose reply was lost, or a manager that stopped
        between a delete and its collection, leaves such bytes: no one learnt what the
        delete freed). Through the claim, so a commit that counts on one of them retries
        rather than loses it. A SCAN of every chunk key: the sweeper runs it rarely.
        Returns chunks collected."""
        if not self.store.has_redis:
            return 0
        now = time.monotonic()
        found: dict[str, list[bytes]] = {}
        for tenant, digest in self.store.chunks_in_redis():
            found.setdefault(tenant, []).append(digest)
        seen: dict[PinKey, float] = {}
        due: dict[str, list[bytes]] = {}
        for tenant, digests in found.items():
            for start in range(0, len(digests), 1000):
                for digest in self.catalog.missing(tenant, digests[start : start + 1000]):
                    first = self._orphans_seen.get((tenant, digest), now)
                    if now - first >= ORPHAN_GRACE_S and not self.pins.is_pinned(tenant, digest):
                        due.setdefault(tenant, []).append(digest)
                    else:
                        seen[(tenant, digest)] = first
        self._orphans_seen = seen
        done = 0
        for tenant, digests in due.items():
            done += self._claim_and_remove(tenant, digests, check_pins=True)
        if done:
            log.info("orphan_chunks_collected", chunks=done)
        return done
