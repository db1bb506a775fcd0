"""WindowManager: the domain object behind WindowService.

It owns the catalog, the tiers and the two executors (one thread for SQLite, a few for disk
I/O and hashing), and the pins that keep a chunk file alive while a stream depends on it:
a delete never unlinks a file that an in-flight freeze or thaw still needs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import structlog

from cwm_client import pb
from cwm_client.chunks import DIGEST_SIZE
from cwm_client.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from cwm_client.names import check_window_name
from cwm_server.manager.catalog import Catalog, WindowExists, WindowGone, basic_view
from cwm_server.manager.chunk_store import ChunkStore
from cwm_server.manager.config import ManagerConfig
from cwm_server.manager.disk_tier import DiskTier
from cwm_server.manager.encryption import Keyring
from cwm_server.manager.memory_tier import MemoryTier
from cwm_server.manager.metadata import check_labels, expiry_from_ttl, now_timestamp
from cwm_server.manager.quotas import QuotaLedger, QuotaPolicy
from cwm_server.manager.redis_catalog import RedisCatalog, open_redis
from cwm_server.manager.uploads import Uploads

T = TypeVar("T")
log = structlog.get_logger("cwm.manager")

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
MAX_DIGESTS_PER_LOOKUP = 100_000


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
        self._deferred: set[tuple[str, bytes]] = set()
        """Shared catalog: chunks a collection skipped because a local stream pinned them,
        collected when the last pin goes (Redis has no restart that would sweep them)."""
        self._deferred_tasks: set[asyncio.Future[int]] = set()
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
        self._pins.update(keys)
        return keys

    def unpin(self, keys: Iterable[tuple[str, bytes]]) -> None:
        for key in keys:
            self._pins[key] -= 1
            if self._pins[key] <= 0:
                del self._pins[key]
                if key in self._deferred:
                    self._deferred.discard(key)
                    task = asyncio.ensure_future(self.collect(key[0], [key[1]]))
                    self._deferred_tasks.add(task)
                    task.add_done_callback(self._deferred_tasks.discard)

    def is_pinned(self, tenant: str, digest: bytes) -> bool:
        return self._pins.get((tenant, digest), 0) > 0

    async def collect(self, tenant: str, digests: Iterable[bytes]) -> int:
        """Unlink files of chunks with no catalog row, unless a live stream pins them."""
        digests = list(digests)
        candidates = [d for d in digests if not self.is_pinned(tenant, d)]
        catalog = self.catalog
        if isinstance(catalog, RedisCatalog):
            self._deferred.update((tenant, d) for d in digests if self.is_pinned(tenant, d))
        if not candidates:
            return 0
        if isinstance(catalog, RedisCatalog):
            return await self.db(self._collect_shared, catalog, tenant, candidates)

        def _collect() -> int:
            removed = 0
            for digest in candidates:
                if self.catalog.chunk(tenant, digest) is None:
                    self.store.remove(tenant, digest)
                    removed += 1
            return removed

        return await self.db(_collect)

    def _collect_shared(self, catalog: RedisCatalog, tenant: str, digests: list[bytes]) -> int:
        """Collection with the shared catalog: claim the chunks no window references (so
        no commit can take them meanwhile), delete their bytes everywhere, release the
        claims (see redis_catalog). A claim left by a failure is redone by any manager."""
        try:
            claimed = catalog.claim_unreferenced(tenant, digests)
            if claimed:
                for digest in claimed:
                    self.store.remove(tenant, digest)
                catalog.release_claims(tenant, claimed)
        except Unavailable as exc:
            log.warning("collect_deferred", tenant=tenant, chunks=len(digests), detail=str(exc))
            return 0
        return len(claimed)

    def sweep_stale_claims(self) -> int:
        """Finish collections that a manager left half-done (it died or lost Redis between
        claiming chunks and releasing them). Runs on the catalog thread."""
        catalog = self.catalog
        if not isinstance(catalog, RedisCatalog):
            return 0
        done = 0
        for tenant in catalog.all_tenants():
            stale = catalog.stale_claims(tenant)
            if stale:
                done += self._collect_shared(catalog, tenant, stale)
        return done

    # -- start-up -----------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Remove what a crash left behind: temp files, and chunk files no window commits.

        A chunk file gets its catalog row only in the transaction that commits a window, so
        a file without a row belongs to a stream that never committed.
        """
        temp = self.disk.remove_temp_files()
        orphans = 0
        try:
            for tenant, digest, path in list(self.disk.iter_chunks()):
                if self.catalog.chunk(tenant, digest) is None:
                    path.unlink(missing_ok=True)
                    orphans += 1
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
        if request.page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(
                f"page_size {request.page_size} exceeds {MAX_PAGE_SIZE}", field="page_size"
            )
        page_size = request.page_size or DEFAULT_PAGE_SIZE
        after = _decode_page_token(request.page_token)
        full = request.view == pb.WindowView.WINDOW_VIEW_FULL
        wanted_tags = dict(request.tags)

        def _page() -> tuple[list[pb.WindowInfo], str]:
            found: list[pb.WindowInfo] = []
            cursor = after
            batch_size = max(page_size + 1, DEFAULT_PAGE_SIZE)
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
                return found, _encode_page_token(found[-1].name)
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
            if self.quotas.limited(tenant) and not self.catalog.window_exists(
                tenant, request.new_name
            ):
                self.quotas.check_windows(tenant, lambda: self.catalog.tenant_usage(tenant))
            try:
                freed = self.catalog.clone_window(source, clone)
            except WindowExists:
                raise window_exists_error(request.new_name) from None
            except WindowGone:
                raise window_not_found(request.source_name) from None
            return clone, freed

        try:
            window, freed = await self.db(_clone)
        except ResourceExhausted:
            if not await self.collect_expired(tenant):
                raise
            window, freed = await self.db(_clone)
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

    # -- TTLs (ttl_collector.py) ----------------------------------------------------------

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
        expired = await self.db(self.catalog.expired_windows, now, limit)
        count = 0
        for owner, name in expired:
            if tenant is not None and owner != tenant:
                continue
            if await self.expire(owner, name, now) is not None:
                count += 1
        return count


def _tags_match(have: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    return all(have.get(k) == v for k, v in wanted.items())


def _encode_page_token(last_name: str) -> str:
    return base64.urlsafe_b64encode(last_name.encode()).decode()


def _decode_page_token(token: str) -> str:
    if not token:
        return ""
    try:
        name = base64.urlsafe_b64decode(token.encode()).decode()
        return check_window_name(name)
    except (binascii.Error, UnicodeDecodeError, ValueError, InvalidArgument):
        raise InvalidArgument(
            "page_token is not one this server issued; pass next_page_token unchanged",
            field="page_token",
        ) from None


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
