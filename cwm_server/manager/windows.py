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
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import structlog

from cwm_client import pb
from cwm_client.chunks import DIGEST_SIZE
from cwm_client.errors import AlreadyExists, InvalidArgument, NotFound
from cwm_client.names import check_window_name
from cwm_server.manager.catalog import Catalog, WindowExists, WindowGone, basic_view
from cwm_server.manager.chunk_store import ChunkStore
from cwm_server.manager.config import ManagerConfig
from cwm_server.manager.disk_tier import DiskTier
from cwm_server.manager.memory_tier import MemoryTier
from cwm_server.manager.metadata import check_labels, expiry_from_ttl, now_timestamp
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
        self.catalog = Catalog(config.data_dir / "catalog.sqlite")
        self.disk = DiskTier(config.data_dir, fsync=config.fsync)
        self.memory = MemoryTier(config.memory_cache_bytes)
        self.store = ChunkStore(self.disk, self.memory, compress=config.compress)
        self._db_executor = ThreadPoolExecutor(1, thread_name_prefix="cwm-catalog")
        self._io_executor = ThreadPoolExecutor(config.io_threads, thread_name_prefix="cwm-io")
        self._pins: Counter[tuple[str, bytes]] = Counter()
        self.uploads = Uploads(config.upload_ttl_s, self.pin, self.unpin, self.collect)
        """The open uploads of parallel freezes (see `uploads`)."""
        self._store_slots: asyncio.Semaphore | None = None

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

    def is_pinned(self, tenant: str, digest: bytes) -> bool:
        return self._pins.get((tenant, digest), 0) > 0

    async def collect(self, tenant: str, digests: Iterable[bytes]) -> int:
        """Unlink files of chunks with no catalog row, unless a live stream pins them."""
        candidates = [d for d in digests if not self.is_pinned(tenant, d)]
        if not candidates:
            return 0

        def _collect() -> int:
            removed = 0
            for digest in candidates:
                if self.catalog.chunk(tenant, digest) is None:
                    self.store.remove(tenant, digest)
                    removed += 1
            return removed

        return await self.db(_collect)

    # -- start-up -----------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Remove what a crash left behind: temp files, and chunk files no window commits.

        A chunk file gets its catalog row only in the transaction that commits a window, so
        a file without a row belongs to a stream that never committed.
        """
        temp = self.disk.remove_temp_files()
        orphans = 0
        for tenant, digest, path in list(self.disk.iter_chunks()):
            if self.catalog.chunk(tenant, digest) is None:
                path.unlink(missing_ok=True)
                orphans += 1
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

        def _clone() -> pb.WindowInfo:
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
            try:
                self.catalog.clone_window(source, clone)
            except WindowExists:
                raise window_exists_error(request.new_name) from None
            except WindowGone:
                raise window_not_found(request.source_name) from None
            return clone

        window = await self.db(_clone)
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
