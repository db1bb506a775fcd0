"""WindowManager: the domain object behind WindowService.

It owns the catalog, the tiers and the two executors (one thread for SQLite, a few for disk
I/O and hashing), and the pins that keep a chunk file alive while a stream depends on it:
a delete never unlinks a file that an in-flight freeze or thaw still needs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import structlog

from cwm_client import pb
from cwm_client.chunks import DIGEST_SIZE
from cwm_client.errors import (
    AlreadyExists,
    CwmError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from cwm_client.names import check_window_name
from cwm_server.manager import paging
from cwm_server.manager.catalog.redis import RedisCatalog, open_redis
from cwm_server.manager.catalog.sqlite import (
    Catalog,
    KeyedCatalog,
    WindowExists,
    WindowGone,
    basic_view,
)
from cwm_server.manager.config import ManagerConfig
from cwm_server.manager.quotas import QuotaLedger, QuotaPolicy
from cwm_server.manager.tiers.disk import DiskTier
from cwm_server.manager.tiers.memory import MemoryTier
from cwm_server.manager.tiers.redis import tenant_from_tag
from cwm_server.manager.tiers.sealing import Keyring
from cwm_server.manager.tiers.store import ChunkStore
from cwm_server.manager.windows.checks import check_labels, expiry_from_ttl, now_timestamp
from cwm_server.manager.windows.uploads import Uploads

T = TypeVar("T")
log = structlog.get_logger("cwm.manager")

MAX_DIGESTS_PER_LOOKUP = 100_000
ORPHAN_GRACE_S = 3600.0
"""Fleet mode: how long a chunk in Redis must stay without a catalog row (seen so by two
orphan sweeps this far apart) before the sweep collects it. Longer than any freeze or
upload keeps chunks uncommitted (`upload_ttl_s` is 600 s by default); one that takes
longer still is safe, only slower: its commit re-sends (or asks for) the chunk."""


@dataclass(frozen=True)
class RecoveryReport:
    temp_files_removed: int
    orphan_chunks_removed: int


class WindowManager:
    def __init__(self, config: ManagerConfig) -> None:
        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.redis, redis_tier, shared = open_redis(config)
        """The link to Redis (None without a Redis tier); `shared`: the fleet's catalog."""
        self.catalog: Catalog | RedisCatalog = (
            shared if shared is not None else Catalog(config.data_dir / "catalog.sqlite")
        )
        self.keyed_catalog = (
            KeyedCatalog(self.catalog) if isinstance(self.catalog, Catalog) else None
        )
        """The key rows of KeyedChunkService; only the embedded SQLite catalog has them."""
        self.disk = DiskTier(config.data_dir, fsync=config.fsync)
        self.memory = MemoryTier(config.memory_cache_bytes)
        self.store = ChunkStore(
            self.disk,
            self.memory,
            compress=config.compress,
            redis=redis_tier,
            disk_enabled=config.redis_policy != "redis-only",
            redis_required=shared is not None,
        )
        if shared is not None:
            shared.bytes_present = self.store.ensure_in_redis
        self._db_executor = ThreadPoolExecutor(1, thread_name_prefix="cwm-catalog")
        self._io_executor = ThreadPoolExecutor(config.io_threads, thread_name_prefix="cwm-io")
        self._pins: Counter[tuple[str, bytes]] = Counter()
        self._pin_lock = threading.Lock()
        """Guards `_pins` and `_deferred`: pins change on the event loop, collections
        check them on the catalog thread."""
        self._deferred: set[tuple[str, bytes]] = set()
        """Chunks a collection skipped because a local stream pinned them, collected when
        the last pin goes (with either catalog: a restart sweeps only local files, never
        Redis copies, and a manager may run for months)."""
        self._deferred_tasks: set[asyncio.Future[int]] = set()
        self._unclaimed: set[tuple[str, bytes]] = set()
        """Shared catalog: chunks freed by a delete whose collection could not claim them
        (Redis away or refusing); the health check's sweep tries them again."""
        self.redis_deletes_pending = redis_tier is not None and shared is None
        """Local catalog with a Redis tier: whether the catalog may list Redis copies still
        to delete (unknown at start, so True); the health check retries them."""
        self._orphans_seen: dict[tuple[str, bytes], float] = {}
        """Fleet mode: chunks in Redis without a catalog row, and when a sweep first saw
        them so (`sweep_orphan_chunks`)."""
        self.uploads = Uploads(config.upload_ttl_s, self.pin, self.unpin, self.collect)
        """The open uploads of parallel freezes (see `uploads`)."""
        self._store_slots: asyncio.Semaphore | None = None
        self.quotas = QuotaLedger(
            QuotaPolicy.load(config.quota_file) if config.quota_file is not None else None
        )
        """Per-tenant limits and the reservations of freezes in flight (quotas.py)."""
        if config.key_file is not None:
            self.store.keyring = Keyring.load(config.key_file)

    def store_slots(self) -> asyncio.Semaphore:
        """Chunks being verified and stored at once, across every freeze stream."""
        if self._store_slots is None:
            self._store_slots = asyncio.Semaphore(max(1, self.config.io_threads))
        return self._store_slots

    def close(self) -> None:
        self.uploads.close_all()
        self._io_executor.shutdown(wait=True)
        self._db_executor.shutdown(wait=True)
        self.catalog.close()
        if self.redis is not None:
            self.redis.close()

    # -- executors and pins -------------------------------------------------------------

    async def db(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._db_executor, fn, *args)

    async def io(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io_executor, fn, *args)

    def submit_io(self, fn: Callable[..., T], *args: object) -> concurrent.futures.Future[T]:
        """Run blocking work on the I/O threads, returning the thread-side future (which a
        caller can wait for even after the awaiting task was cancelled)."""
        return self._io_executor.submit(fn, *args)

    def pin(self, tenant: str, digests: Iterable[bytes]) -> list[tuple[str, bytes]]:
        keys = [(tenant, d) for d in set(digests)]
        with self._pin_lock:
            self._pins.update(keys)
        return keys

    def unpin(self, keys: Iterable[tuple[str, bytes]]) -> None:
        """Drop pins; a chunk a collection deferred while pinned is collected now (if it
        still has no catalog row: `collect` checks)."""
        due: dict[str, list[bytes]] = {}
        with self._pin_lock:
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
            task = asyncio.ensure_future(self.collect(tenant, digests))
            self._deferred_tasks.add(task)
            task.add_done_callback(self._deferred_tasks.discard)

    def is_pinned(self, tenant: str, digest: bytes) -> bool:
        return self._pins.get((tenant, digest), 0) > 0

    def _defer_if_pinned(self, tenant: str, digest: bytes) -> bool:
        """True (and remembered for the last unpin) if a live stream pins the chunk."""
        with self._pin_lock:
            if self._pins.get((tenant, digest), 0) > 0:
                self._deferred.add((tenant, digest))
                return True
            return False

    async def collect(self, tenant: str, digests: Iterable[bytes]) -> int:
        """Remove chunks with no catalog row from every tier, unless a live stream pins
        them (then when its last pin goes). Redis trouble never fails it (the rows are
        gone already, the caller's change has committed): what cannot be cleaned now is
        logged and cleaned later (the health check's retries and sweeps; start-up
        recovery for local files)."""
        digests = list(dict.fromkeys(digests))
        candidates = [d for d in digests if not self._defer_if_pinned(tenant, d)]
        if not candidates:
            return 0
        catalog = self.catalog
        if isinstance(catalog, RedisCatalog):
            return await self.db(self._collect_shared, catalog, tenant, candidates, True)
        return await self.db(self._collect_local, catalog, tenant, candidates)

    def _collect_local(self, catalog: Catalog, tenant: str, digests: list[bytes]) -> int:
        """Collection with this manager's own catalog, chunk by chunk (one that fails does
        not strand the rest). Runs on the catalog thread, so no commit interleaves between
        a row check and a removal; a pin is checked again here, as a stream may have pinned
        the chunk since `collect` looked."""
        unreferenced: list[bytes] = []
        for digest in digests:
            if self._defer_if_pinned(tenant, digest) or catalog.chunk(tenant, digest):
                continue
            unreferenced.append(digest)
            try:
                self.store.remove_local(tenant, digest)
            except OSError as exc:  # start-up recovery removes the file
                log.warning(
                    "collect_failed", tenant=tenant, digest=digest.hex()[:16], detail=str(exc)
                )
        if unreferenced and self.store.redis is not None:
            self._remove_redis_copies(catalog, tenant, unreferenced)
        return len(unreferenced)

    def _remove_redis_copies(self, catalog: Catalog, tenant: str, digests: list[bytes]) -> None:
        """Delete Redis copies of collected chunks; if Redis is away (or refuses), list them
        in the catalog for `retry_redis_deletes` instead of failing the caller."""
        assert self.store.redis is not None
        try:
            self.store.redis.remove_many(tenant, digests)
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
            catalog.add_redis_pending(tenant, digests)
            self.redis_deletes_pending = True
        except sqlite3.Error as exc:  # the copies stay in Redis: say so
            log.error("redis_delete_lost", tenant=tenant, chunks=len(digests), detail=str(exc))

    def retry_redis_deletes(self, batch: int = 1000) -> int:
        """Delete Redis copies listed as pending (see `_remove_redis_copies`), unless the
        chunk has a catalog row again (its copy is then the chunk's) or a stream pins it
        (next time). Runs on the catalog thread, from the health check once Redis answers;
        raises UNAVAILABLE if Redis is away again (the rows stay). Returns copies deleted."""
        catalog = self.catalog
        redis = self.store.redis
        if redis is None or not isinstance(catalog, Catalog) or not self.redis_deletes_pending:
            return 0
        pending = catalog.redis_pending(batch)
        by_tenant: dict[str, list[bytes]] = {}
        settled: dict[str, list[tuple[str, bytes]]] = {}
        skipped = 0
        for tenant, digest in pending:
            if self.is_pinned(tenant, digest):
                skipped += 1
                continue
            settled.setdefault(tenant, []).append((tenant, digest))
            if catalog.chunk(tenant, digest) is None:
                by_tenant.setdefault(tenant, []).append(digest)
        deleted = 0
        for tenant, items in settled.items():
            digests = by_tenant.get(tenant, [])
            if digests:
                redis.remove_many(tenant, digests)
                deleted += len(digests)
            catalog.drop_redis_pending(items)
        if len(pending) < batch and not skipped:
            self.redis_deletes_pending = False
        if deleted:
            log.info("redis_deletes_done", chunks=deleted)
        return deleted

    def _collect_shared(
        self, catalog: RedisCatalog, tenant: str, digests: list[bytes], check_pins: bool = False
    ) -> int:
        """Collection with the shared catalog: claim the chunks no window references (so
        no commit can take them meanwhile), delete their bytes everywhere, release the
        claims (see redis_catalog). A claim left by a failure is redone by any manager; a
        claim that could not be made is retried by this manager's sweep."""
        if check_pins:
            digests = [d for d in digests if not self._defer_if_pinned(tenant, d)]
        claimed: list[bytes] = []
        try:
            claimed = catalog.claim_unreferenced(tenant, digests)
            for digest in claimed:
                self.store.remove(tenant, digest)
            catalog.release_claims(tenant, claimed)
        except CwmError as exc:
            if not claimed:
                with self._pin_lock:
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
        could not claim their chunks. Runs on the catalog thread."""
        catalog = self.catalog
        if not isinstance(catalog, RedisCatalog):
            return 0
        done = 0
        with self._pin_lock:
            unclaimed, self._unclaimed = self._unclaimed, set()
        retry: dict[str, list[bytes]] = {}
        for tenant, digest in unclaimed:
            retry.setdefault(tenant, []).append(digest)
        for tenant, digests in retry.items():
            done += self._collect_shared(catalog, tenant, digests, True)
        for tenant in catalog.all_tenants():
            stale = catalog.stale_claims(tenant)
            if stale:
                done += self._collect_shared(catalog, tenant, stale)
        return done

    def sweep_orphan_chunks(self) -> int:
        """Fleet mode: collect chunks whose bytes are in Redis but that no catalog row has
        referenced for `ORPHAN_GRACE_S` (a delete whose reply was lost, or a manager that
        stopped between a delete and its collection, leaves such bytes: no one learnt what
        the delete freed). Through the claim, so a commit that counts on one of them
        retries rather than loses it. A SCAN of every chunk key: the health check runs it
        rarely, on a thread of its own (it touches only Redis). Returns chunks collected."""
        catalog = self.catalog
        tier = self.store.redis
        if not isinstance(catalog, RedisCatalog) or tier is None:
            return 0
        now = time.monotonic()
        found: dict[str, list[bytes]] = {}
        for tag, digest in tier.scan_chunks():
            tenant = tenant_from_tag(tag)
            if tenant is not None:
                found.setdefault(tenant, []).append(digest)
        seen: dict[tuple[str, bytes], float] = {}
        due: dict[str, list[bytes]] = {}
        for tenant, digests in found.items():
            for start in range(0, len(digests), 1000):
                for digest in catalog.missing(tenant, digests[start : start + 1000]):
                    first = self._orphans_seen.get((tenant, digest), now)
                    if now - first >= ORPHAN_GRACE_S and not self.is_pinned(tenant, digest):
                        due.setdefault(tenant, []).append(digest)
                    else:
                        seen[(tenant, digest)] = first
        self._orphans_seen = seen
        done = 0
        for tenant, digests in due.items():
            done += self._collect_shared(catalog, tenant, digests, True)
        if done:
            log.info("orphan_chunks_collected", chunks=done)
        return done

    # -- start-up -----------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Remove what a crash left behind: temp files, and chunk files no window commits.

        A chunk file gets its catalog row only in the transaction that commits a window, so
        a file without a row belongs to a stream that never committed.
        """
        temp = self.disk.remove_temp_files()
        orphans = 0
        catalog = self.catalog
        try:
            for tenant, digest, path in list(self.disk.iter_chunks()):
                if catalog.chunk(tenant, digest) is None:
                    path.unlink(missing_ok=True)
                    orphans += 1
                    if self.store.redis is not None and isinstance(catalog, Catalog):
                        # Its Redis copy (a stream that never committed wrote it too):
                        # deleted once Redis answers (`retry_redis_deletes`).
                        catalog.add_redis_pending(tenant, [digest])
        except Unavailable as exc:  # the shared catalog is away: keep the files for now
            log.warning("recover_orphans_skipped", detail=str(exc))
        report = RecoveryReport(temp_files_removed=temp, orphan_chunks_removed=orphans)
        log.info("recovered", temp_files=temp, orphan_chunks=orphans)
        return report

    # -- catalog operations ---------------------------------------------------------------

    async def find_missing(self, tenant: str, digests: list[bytes]) -> list[bytes]:
        if len(digests) > MAX_DIGESTS_PER_LOOKUP:
            raise InvalidArgument(
                f"at most {MAX_DIGESTS_PER_LOOKUP} digests per call, got {len(digests)}",
                field="digests",
            )
        for position, digest in enumerate(digests):
            if len(digest) != DIGEST_SIZE:
                raise InvalidArgument(
                    f"digests[{position}] is {len(digest)} bytes; BLAKE3 digests are {DIGEST_SIZE}",
                    field=f"digests[{position}]",
                )
        return await self.db(self.catalog.missing, tenant, digests)

    async def get(self, tenant: str, name: str, view: int) -> pb.WindowInfo:
        check_window_name(name)
        full = view != pb.WindowView.WINDOW_VIEW_BASIC
        window = await self.db(self.catalog.get_window, tenant, name, full)
        if window is None:
            raise window_not_found(name)
        return window

    async def list(
        self, tenant: str, request: pb.ListWindowsRequest
    ) -> tuple[list[pb.WindowInfo], str]:
        page_size = paging.page_size(request.page_size)
        after = paging.decode_page_token(request.page_token, check_window_name)
        full = request.view == pb.WindowView.WINDOW_VIEW_FULL
        wanted_tags = dict(request.tags)

        def _page() -> tuple[list[pb.WindowInfo], str]:
            found: list[pb.WindowInfo] = []
            cursor = after
            batch_size = max(page_size + 1, paging.DEFAULT_PAGE_SIZE)
            while len(found) <= page_size:
                batch = self.catalog.list_windows(
                    tenant,
                    after=cursor,
                    name_prefix=request.name_prefix,
                    session_id=request.session_id,
                    model_id=request.model_id,
                    search=request.search,
                    limit=batch_size,
                    full=full,
                )
                for window in batch:
                    cursor = window.name
                    if _tags_match(window.tags, wanted_tags):
                        found.append(window)
                        if len(found) > page_size:
                            break
                if len(batch) < batch_size:
                    break
            if len(found) > page_size:
                found = found[:page_size]
                return found, paging.encode_page_token(found[-1].name)
            return found, ""

        return await self.db(_page)

    async def clone(self, tenant: str, request: pb.CloneWindowRequest) -> pb.WindowInfo:
        check_window_name(request.source_name, "source_name")
        check_window_name(request.new_name, "new_name")
        check_labels(request.tags, request.description)
        expires = expiry_from_ttl(request.ttl_seconds)

        def _clone() -> tuple[pb.WindowInfo, list[bytes]]:
            source = self.catalog.get_window(tenant, request.source_name)
            if source is None:
                raise window_not_found(request.source_name)
            clone = pb.WindowInfo()
            clone.CopyFrom(source)
            clone.name = request.new_name
            clone.parent = source.name
            clone.pinned = False
            if request.description:
                clone.description = request.description
            if request.tags:
                clone.ClearField("tags")
                clone.tags.update(request.tags)
            clone.created_at.CopyFrom(now_timestamp())
            clone.ClearField("expires_at")
            if expires is not None:
                clone.expires_at.CopyFrom(expires)
            self.check_window_quota(tenant, request.new_name)
            try:
                freed = self.catalog.clone_window(source, clone)
            except WindowExists:
                raise window_exists_error(request.new_name) from None
            except WindowGone:
                raise window_not_found(request.source_name) from None
            return clone, freed

        window, freed = await self.after_collecting_expired(tenant, lambda: self.db(_clone))
        if freed:
            await self.collect(tenant, freed)
        log.info("cloned", tenant=tenant, source=request.source_name, window=window.name)
        return basic_view(window)

    async def delete(self, tenant: str, name: str) -> tuple[int, int]:
        check_window_name(name)
        freed = await self.db(self.catalog.delete_window, tenant, name)
        if freed is None:
            raise window_not_found(name)
        removed = await self.collect(tenant, [d for d, _ in freed])
        log.info("deleted", tenant=tenant, window=name, chunks_freed=len(freed), unlinked=removed)
        return len(freed), sum(size for _, size in freed)

    # -- quotas and TTLs --------------------------------------------------------------------

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

    def check_window_quota(self, tenant: str, name: str) -> None:
        """Refuse (RESOURCE_EXHAUSTED) a window that would be new under `name` if the
        tenant is at its window quota; replacing a live window adds none. On the catalog
        thread, inside the call that then commits, so no commit slips in between."""
        if self.quotas.limited(tenant) and not self.catalog.window_exists(tenant, name):
            self.quotas.check_windows(tenant, lambda: self.catalog.tenant_usage(tenant))

    async def expire(self, tenant: str, name: str, now: float) -> int | None:
        """Delete a window that expired at or before `now`, through the delete path (its
        chunks no other window uses are collected); returns the chunks freed, or None if
        it was not (or no longer) expired."""
        freed = await self.db(self.catalog.delete_expired_window, tenant, name, now)
        if freed is None:
            return None
        removed = await self.collect(tenant, [d for d, _ in freed])
        log.info("expired", tenant=tenant, window=name, chunks_freed=len(freed), unlinked=removed)
        return len(freed)

    async def collect_expired(self, tenant: str | None = None, limit: int = 1000) -> int:
        """Delete windows that have expired (only `tenant`'s, if given); returns how many.
        The collector calls it every interval; a quota check calls it for its tenant
        before it refuses."""
        now = time.time()
        expired = await self.db(self.catalog.expired_windows, now, limit, tenant)
        count = 0
        for owner, name in expired:
            if tenant is not None and owner != tenant:
                continue  # a catalog asked for one tenant returns only its windows
            if await self.expire(owner, name, now) is not None:
                count += 1
        return count


def _tags_match(have: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    return all(have.get(k) == v for k, v in wanted.items())


def window_not_found(name: str) -> NotFound:
    return NotFound(
        f"no window {name!r}; `cwm ls` lists what exists",
        reason="WINDOW_NOT_FOUND",
        metadata={"window": name},
    )


def window_exists_error(name: str) -> AlreadyExists:
    return AlreadyExists(
        f"window {name!r} already exists; choose another name, delete it first, or ask to "
        "replace it",
        reason="WINDOW_EXISTS",
        metadata={"window": name},
    )
