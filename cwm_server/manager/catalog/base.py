"""What a window catalog offers, whichever store holds it, and the rows both speak.

Two implementations subclass `WindowCatalog`: `sqlite.SqliteCatalog` (SQLite in WAL mode,
one manager per data dir, the embedded default) and `redis.RedisCatalog` (Redis or Redis
Cluster, shared by every manager of a fleet). Which one a manager uses is decided once, when
it starts (`housekeeping.backend.open_backend`); the window operations, freeze, thaw and
housekeeping use only what is declared here, so nothing later asks which catalog it has.

A method one implementation cannot offer raises a `cwm_client.errors` error (UNIMPLEMENTED or
FAILED_PRECONDITION) with a message saying why, so a client never sees INTERNAL for it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

from cwm_client import pb
from cwm_server.manager.quotas import Usage


@dataclass(frozen=True)
class ChunkRow:
    digest: bytes
    refcount: int
    raw_size: int
    stored_size: int
    codec: int


@dataclass(frozen=True)
class NewChunk:
    """A chunk a commit may have to insert, with what the disk tier stored."""

    digest: bytes
    raw_size: int
    stored_size: int
    codec: int


class WindowExists(Exception):
    """A window of that name exists (and the request did not ask to replace it)."""


class CommitAbandoned(Exception):
    """The stream behind a commit ended (cancelled) before the transaction committed."""


class WindowGone(Exception):
    """The window disappeared between reading it and changing the catalog."""


def basic_view(full: pb.WindowInfo) -> pb.WindowInfo:
    """The window without its token ids and chunk list (what BASIC views and lists carry)."""
    basic = pb.WindowInfo()
    basic.CopyFrom(full)
    basic.ClearField("token_ids")
    basic.ClearField("chunks")
    return basic


class WindowCatalog(abc.ABC):
    """Windows, and the reference counts of the chunks they use.

    Every write is atomic: a window row and the reference counts of all its chunks change
    together, which is what makes a commit all-or-nothing and a clone O(1) in bytes. A
    window whose expiry has passed is invisible to every read (get, list, exists, delete,
    clone) until the TTL collector deletes it; a pinned window never expires."""

    @abc.abstractmethod
    def snapshot(self) -> AbstractContextManager[None]:
        """Reads inside see windows and chunk rows as of one commit (where the store can)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    # -- reads ------------------------------------------------------------------------

    @abc.abstractmethod
    def get_window(self, tenant: str, name: str, full: bool = True) -> pb.WindowInfo | None:
        """The live window (FULL view, or BASIC without `full`), None if absent or expired."""

    @abc.abstractmethod
    def window_exists(self, tenant: str, name: str, include_expired: bool = False) -> bool:
        """True if the window exists and has not expired (or, with `include_expired`, if
        its row exists at all: an expired window the collector has not deleted yet)."""

    @abc.abstractmethod
    def chunk(self, tenant: str, digest: bytes) -> ChunkRow | None: ...

    @abc.abstractmethod
    def missing(self, tenant: str, digests: Iterable[bytes]) -> list[bytes]:
        """The digests of `digests` without a chunk row, in order."""

    @abc.abstractmethod
    def has_chunk_rows(self, tenant: str, digests: Iterable[bytes]) -> set[bytes]:
        """The digests of `digests` that have a chunk row."""

    @abc.abstractmethod
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
    ) -> list[pb.WindowInfo]:
        """Up to `limit` live windows ordered by name after `after`, filtered by name
        prefix, session, model and a case-insensitive search of name and description."""

    @abc.abstractmethod
    def iter_all_windows(self) -> Iterator[pb.WindowInfo]:
        """Every window of every tenant (checks)."""

    @abc.abstractmethod
    def iter_chunks(self) -> Iterator[tuple[str, ChunkRow]]:
        """(tenant, row) of every chunk row (checks)."""

    # -- writes (each atomic) -----------------------------------------------------------

    @abc.abstractmethod
    def commit_window(
        self,
        window: pb.WindowInfo,
        new_chunks: dict[bytes, NewChunk],
        replace: bool,
        still_wanted: Callable[[], bool] | None = None,
    ) -> list[bytes]:
        """Insert `window` and take a reference on each of its chunks, atomically.

        Chunks without a row get one from `new_chunks`. With `replace`, an existing window
        of the same name is dropped in the same change, after the new references are taken
        (so chunks both share survive); the digests that lost their last reference are
        returned so the caller can collect them. Raises WindowExists (a live window of that
        name, without `replace`), and CommitAbandoned if `still_wanted` says no just before
        the change commits (the stream was cancelled meanwhile)."""

    @abc.abstractmethod
    def clone_window(self, source: pb.WindowInfo, clone: pb.WindowInfo) -> list[bytes]:
        """Insert `clone`, sharing every chunk of `source`; returns the digests freed by
        dropping an expired window of the clone's name. Raises WindowExists, or WindowGone
        if the source is no longer there."""

    @abc.abstractmethod
    def delete_window(self, tenant: str, name: str) -> list[tuple[bytes, int]] | None:
        """Drop a live window; returns (digest, stored_size) of the chunks it freed, None
        if there was no such window."""

    @abc.abstractmethod
    def insert_chunk_row(self, tenant: str, row: ChunkRow) -> None:
        """fsck's repair: give an intact chunk that windows reference its missing row."""

    @abc.abstractmethod
    def set_refcount(self, tenant: str, digest: bytes, refcount: int) -> None:
        """fsck's repair: make a row's count what the windows say (0 removes the row)."""

    # -- TTLs and quotas ----------------------------------------------------------------

    @abc.abstractmethod
    def expired_windows(
        self, now: float, limit: int = 100, tenant: str | None = None
    ) -> list[tuple[str, str]]:
        """(tenant, name) of up to `limit` windows that expired at or before `now`,
        soonest-expired first; only `tenant`'s if given (a quota check must find its own
        tenant's expired windows whatever other tenants hold, and look at nothing else)."""

    @abc.abstractmethod
    def tenant_usage(self, tenant: str) -> Usage:
        """What `tenant` holds: windows (expired ones not yet collected included), distinct
        chunks and their raw and stored bytes (each chunk once, however many windows or
        keys share it)."""

    @abc.abstractmethod
    def delete_expired_window(
        self, tenant: str, name: str, now: float
    ) -> list[tuple[bytes, int]] | None:
        """`delete_window` for the TTL collector: drops the window only if it is still
        expired at `now` (a fresh window of the same name may have replaced it meanwhile);
        returns (digest, stored_size) of the chunks freed, None if nothing was dropped."""
