"""WindowManager: the domain object behind WindowService, and its catalog operations.

It holds what a manager is made of, chosen once at start (`housekeeping.backend`): the
catalog, the tiers behind the chunk store, the collection strategy, the pins, the two
executors, quotas and uploads. Its own methods are the catalog operations of WindowService
(find missing chunks, get, list, clone, delete); freeze and thaw live beside it
(`freeze.py`, `thaw.py`), housekeeping in `housekeeping/`. The other methods delegate to
the part that does the work and keep one surface for freeze, thaw, keyed chunks and the
servicers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TypeVar

import structlog

from cwm_client import pb
from cwm_client.chunks import DIGEST_SIZE
from cwm_client.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from cwm_client.names import check_window_name
from cwm_server.manager import paging
from cwm_server.manager.catalog.base import WindowExists, WindowGone, basic_view
from cwm_server.manager.config import ManagerConfig
from cwm_server.manager.executors import Executors
from cwm_server.manager.housekeeping.backend import open_backend
from cwm_server.manager.housekeeping.pins import PinTable
from cwm_server.manager.housekeeping.recovery import RecoveryReport, recover
from cwm_server.manager.housekeeping.space_reserve import SpaceReserve
from cwm_server.manager.housekeeping.ttl import Expiry
from cwm_server.manager.quotas import QuotaLedger, QuotaPolicy
from cwm_server.manager.windows.checks import check_labels, expiry_from_ttl, now_timestamp
from cwm_server.manager.windows.uploads import Uploads

T = TypeVar("T")
log = structlog.get_logger("cwm.manager")

MAX_DIGESTS_PER_LOOKUP = 100_000


class WindowManager:
    def __init__(self, config: ManagerConfig) -> None:
        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.space_reserve = SpaceReserve(config.data_dir)
        """Room a delete can use on a full disk (`housekeeping.space_reserve`)."""
        self.space_reserve.ensure()
        self.executors = Executors(config.io_threads)
        self.db = self.executors.db
        """Run on the catalog thread (`Executors.db`)."""
        self.io = self.executors.io
        """Run blocking chunk work on the I/O threads (`Executors.io`)."""
        self.submit_io = self.executors.submit_io
        """The thread-side future of work on the I/O threads (`Executors.submit_io`)."""
        self.store_slots = self.executors.store_slots
        """Chunks being stored at once across freeze streams (`Executors.store_slots`)."""
        self.pins = PinTable(self.collect)
        """The chunks live streams depend on (collected when the last pin goes)."""
        self.pin = self.pins.pin
        self.unpin = self.pins.unpin
        """Drop pins; what a collection deferred while they were held is collected now."""
        self.is_pinned = self.pins.is_pinned
        backend = open_backend(config, self.pins, self.executors)
        self.redis = backend.redis
        """The link to Redis (None without a Redis tier)."""
        self.catalog = backend.catalog
        self.keyed_catalog = backend.keyed_catalog
        """The key rows of KeyedChunkService; only the embedded SQLite catalog has them."""
        self.disk = backend.disk
        self.memory = backend.memory
        self.store = backend.store
        self.collector = backend.collector
        """How chunks no row references leave the tiers (local or shared)."""
        self.expiry = Expiry(self.catalog, self.executors, self.collector)
        """Deleting expired windows (the TTL collector and quota checks use it)."""
        self.uploads = Uploads(config.upload_ttl_s, self.pin, self.unpin, self.collect)
        """The open uploads of parallel freezes (see `uploads`)."""
        self.quotas = QuotaLedger(
            QuotaPolicy.load(config.quota_file) if config.quota_file is not None else None
        )
        """Per-tenant limits and the reservations of freezes in flight (quotas.py)."""

    def close(self) -> None:
        self.uploads.close_all()
        self.executors.close()
        self.catalog.close()
        if self.redis is not None:
            self.redis.close()

    # -- housekeeping (delegated: collector, recovery, expiry) -------------------------------

    async def collect(self, tenant: str, digests: Iterable[bytes]) -> int:
        """`collector.collect`: remove chunks with no catalog row from every tier, unless
        a live stream pins them (then when its last pin goes)."""
        return await self.collector.collect(tenant, digests)

    def recover(self) -> RecoveryReport:
        """Remove what a crash left behind (`housekeeping.recovery`)."""
        return recover(self.disk, self.catalog, self.collector)

    async def expire(self, tenant: str, name: str, now: float) -> int | None:
        """`expiry.expire`."""
        return await self.expiry.expire(tenant, name, now)

    async def collect_expired(self, tenant: str | None = None, limit: int = 1000) -> int:
        """`expiry.collect_expired`."""
        return await self.expiry.collect_expired(tenant, limit)

    async def after_collecting_expired(self, tenant: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """`expiry.after_collecting_expired`: retry once after collecting the tenant's
        expired windows if a quota refused."""
        return await self.expiry.after_collecting_expired(tenant, attempt)

    # -- quotas -----------------------------------------------------------------------------

    def check_window_quota(self, tenant: str, name: str) -> None:
        """Refuse (RESOURCE_EXHAUSTED) a window that would be new under `name` if the
        tenant is at its window quota; replacing a live window adds none. On the catalog
        thread, inside the call that then commits, so no commit slips in between."""
        if self.quotas.limited(tenant) and not self.catalog.window_exists(tenant, name):
            self.quotas.check_windows(tenant, lambda: self.catalog.tenant_usage(tenant))

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
        missing: list[bytes] = await self.db(self.catalog.missing, tenant, digests)
        quarantine = self.store.quarantine
        if quarantine is not None and len(quarantine):
            # Quarantined chunks still have rows, but no sound copy: ask for their bytes,
            # so that this freeze heals every window that shares them.
            listed = set(missing)
            missing += [d for d in quarantine.missing(tenant, digests) if d not in listed]
        return missing

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
        try:
            freed = await self.db(self.catalog.delete_window, tenant, name)
        except ResourceExhausted as exc:
            if exc.reason != "DISK_FULL" or not self.space_reserve.release():
                raise
            freed = await self.db(self.catalog.delete_window, tenant, name)  # in the room
        if freed is None:
            raise window_not_found(name)
        removed = await self.collect(tenant, [d for d, _ in freed])
        log.info("deleted", tenant=tenant, window=name, chunks_freed=len(freed), unlinked=removed)
        if not self.space_reserve.held:
            await self.io(self.space_reserve.ensure)  # back, now that space was freed
        return len(freed), sum(size for _, size in freed)


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
        f"window {name!r} already exists; choose another name, delete it first (`cwm rm "
        f"{name}`), or replace it (`cwm freeze --replace`, `replace=True` in the SDK)",
        reason="WINDOW_EXISTS",
        metadata={"window": name},
    )
