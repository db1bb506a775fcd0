"""What a window catalog offers, whichever store holds it.

Two implementations: `catalog.Catalog` (SQLite in WAL mode, one manager per data dir, the
embedded default) and `redis_catalog.RedisCatalog` (Redis or Redis Cluster, shared by every
manager of a fleet). The WindowManager, freeze and thaw use only what is listed here; the
exceptions (`WindowExists`, `WindowGone`, `CommitAbandoned`) and the row types (`ChunkRow`,
`NewChunk`) live in `catalog` and mean the same for both.

A method one implementation cannot offer raises a `cwm_client.errors` error (UNIMPLEMENTED or
FAILED_PRECONDITION) with a message saying why, so a client never sees INTERNAL for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

from cwm_client import pb
from cwm_server.manager.catalog.sqlite import ChunkRow, NewChunk
from cwm_server.manager.quotas import Usage


@runtime_checkable
class CatalogLike(Protocol):
    """The catalog's contract (see `catalog.Catalog` for what each method promises)."""

    def snapshot(self) -> AbstractContextManager[None]: ...

    def close(self) -> None: ...

    # -- reads
    def get_window(self, tenant: str, name: str, full: bool = True) -> pb.WindowInfo | None: ...

    def window_exists(self, tenant: str, name: str, include_expired: bool = False) -> bool: ...

    def chunk(self, tenant: str, digest: bytes) -> ChunkRow | None: ...

    def missing(self, tenant: str, digests: Iterable[bytes]) -> list[bytes]: ...

    def list_windows(
        self,
        tenant: str,
        *,
        after: str,
        name_prefix: str,
        session_id: str,
        model_id: str,
        search: str,
        limit: int,
        full: bool,
    ) -> list[pb.WindowInfo]: ...

    def iter_all_windows(self) -> Iterator[pb.WindowInfo]: ...

    def iter_chunks(self) -> Iterator[tuple[str, ChunkRow]]: ...

    def has_chunk_rows(self, tenant: str, digests: Iterable[bytes]) -> set[bytes]: ...

    # -- writes (each atomic)
    def commit_window(
        self,
        window: pb.WindowInfo,
        new_chunks: dict[bytes, NewChunk],
        replace: bool,
        still_wanted: Callable[[], bool] | None = None,
    ) -> list[bytes]: ...

    def clone_window(self, source: pb.WindowInfo, clone: pb.WindowInfo) -> list[bytes]: ...

    def delete_window(self, tenant: str, name: str) -> list[tuple[bytes, int]] | None: ...

    def insert_chunk_row(self, tenant: str, row: ChunkRow) -> None: ...

    def set_refcount(self, tenant: str, digest: bytes, refcount: int) -> None: ...

    # -- TTLs and quotas
    def expired_windows(
        self, now: float, limit: int = 100, tenant: str | None = None
    ) -> list[tuple[str, str]]: ...

    def tenant_usage(self, tenant: str) -> Usage: ...

    def delete_expired_window(
        self, tenant: str, name: str, now: float
    ) -> list[tuple[bytes, int]] | None: ...
