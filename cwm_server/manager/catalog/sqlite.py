"""The window catalog in SQLite (WAL): windows, and reference counts of the chunks they use.

A window row and the reference counts of all its chunks change in one transaction, which is
what makes a commit atomic and a clone O(1) in bytes. Only one thread uses the connection
(the manager runs every call on its single catalog thread, `executors.Executors.db`), so
there is no locking here. The tables live in `sqlite_schema`; the key rows of
KeyedChunkService, which share this connection and its transactions, in `keyed`.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cwm_client import pb
from cwm_server.manager.catalog.base import (
    ChunkRow,
    CommitAbandoned,
    NewChunk,
    WindowCatalog,
    WindowExists,
    WindowGone,
    basic_view,
)
from cwm_server.manager.catalog.sqlite_schema import LIVE, open_catalog_file
from cwm_server.manager.quotas import Usage


class SqliteCatalog(WindowCatalog):
    """`WindowCatalog` in one SQLite file under the data dir (see the module docstring)."""

    def __init__(self, path: Path, read_only: bool = False) -> None:
        """`read_only` opens an existing catalog for checks (fsck beside a live manager)."""
        self._db = open_catalog_file(path, read_only)

    @property
    def connection(self) -> sqlite3.Connection:
        """The connection, for `keyed.KeyedCatalog`, whose rows change in this catalog's
        transactions (a key and a window change chunk references together)."""
        return self._db

    def transaction(self) -> Transaction:
        """One write transaction (BEGIN IMMEDIATE; rolled back if the block raises)."""
        return Transaction(self._db)

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """One read transaction: windows and chunk rows as of a single commit."""
        self._db.execute("BEGIN")
        try:
            yield
        finally:
            self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    # -- reads -------------------------------------------------------------------------

    def get_window(self, tenant: str, name: str, full: bool = True) -> pb.WindowInfo | None:
        column = "full" if full else "basic"
        row = self._db.execute(
            f"SELECT {column} FROM windows WHERE tenant=? AND name=? AND {LIVE}",
            (tenant, name, time.time()),
        ).fetchone()
        return None if row is None else pb.WindowInfo.FromString(row[0])

    def window_exists(self, tenant: str, name: str, include_expired: bool = False) -> bool:
        """True if the window exists and has not expired (or, with `include_expired`, if
        its row exists at all: an expired window the collector has not deleted yet)."""
        if include_expired:
            row = self._db.execute(
                "SELECT 1 FROM windows WHERE tenant=? AND name=?", (tenant, name)
            ).fetchone()
        else:
            row = self._db.execute(
                f"SELECT 1 FROM windows WHERE tenant=? AND name=? AND {LIVE}",
                (tenant, name, time.time()),
            ).fetchone()
        return row is not None

    def chunk(self, tenant: str, digest: bytes) -> ChunkRow | None:
        row = self._db.execute(
            "SELECT digest, refcount, raw_size, stored_size, codec FROM chunks "
            "WHERE tenant=? AND digest=?",
            (tenant, digest),
        ).fetchone()
        return None if row is None else ChunkRow(*row)

    def missing(self, tenant: str, digests: Iterable[bytes]) -> list[bytes]:
        return [d for d in digests if self.chunk(tenant, d) is None]

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
        """Windows ordered by name after `after`, filtered by everything SQL can filter."""
        column = "full" if full else "basic"
        sql = [f"SELECT {column} FROM windows WHERE tenant=? AND name>? AND {LIVE}"]
        args: list[object] = [tenant, after, time.time()]
        if name_prefix:
            sql.append("AND substr(name, 1, ?) = ?")
            args += [len(name_prefix), name_prefix]
        if session_id:
            sql.append("AND session_id=?")
            args.append(session_id)
        if model_id:
            sql.append("AND model_id=?")
            args.append(model_id)
        if search:
            sql.append("AND (instr(lower(name), ?) > 0 OR instr(lower(description), ?) > 0)")
            args += [search.lower(), search.lower()]
        sql.append("ORDER BY name LIMIT ?")
        args.append(limit)
        rows = self._db.execute(" ".join(sql), args).fetchall()
        return [pb.WindowInfo.FromString(r[0]) for r in rows]

    def iter_all_windows(self) -> Iterator[pb.WindowInfo]:
        for (blob,) in self._db.execute("SELECT full FROM windows ORDER BY tenant, name"):
            yield pb.WindowInfo.FromString(blob)

    def iter_chunks(self) -> Iterator[tuple[str, ChunkRow]]:
        for tenant, *rest in self._db.execute(
            "SELECT tenant, digest, refcount, raw_size, stored_size, codec FROM chunks"
        ):
            yield tenant, ChunkRow(*rest)

    def has_chunk_rows(self, tenant: str, digests: Iterable[bytes]) -> set[bytes]:
        return {d for d in set(digests) if self.chunk(tenant, d) is not None}

    # -- writes (each one transaction) ---------------------------------------------------

    def commit_window(
        self,
        window: pb.WindowInfo,
        new_chunks: dict[bytes, NewChunk],
        replace: bool,
        still_wanted: Callable[[], bool] | None = None,
    ) -> list[bytes]:
        """Insert `window` and take a reference on each of its chunks, atomically.

        Chunks without a row get one from `new_chunks`. With `replace`, an existing window
        of the same name is dropped in the same transaction, after the new references are
        taken (so chunks both share survive); the digests that lost their last reference
        are returned so the caller can collect their files. If `still_wanted` says no just
        before the transaction commits (the stream was cancelled meanwhile), it rolls back
        and raises CommitAbandoned.
        """
        tenant = window.tenant
        with self.transaction():
            exists = self.window_exists(tenant, window.name)
            if exists and not replace:
                raise WindowExists(window.name)
            exists = exists or self.window_exists(tenant, window.name, include_expired=True)
            for digest, count in Counter(ref.digest for ref in window.chunks).items():
                updated = self._db.execute(
                    "UPDATE chunks SET refcount = refcount + ? WHERE tenant=? AND digest=?",
                    (count, tenant, digest),
                ).rowcount
                if not updated:
                    new = new_chunks[digest]
                    self._db.execute(
                        "INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?)",
                        (tenant, digest, count, new.raw_size, new.stored_size, new.codec),
                    )
            freed = self._drop_window(tenant, window.name) if exists else []
            self._insert_window(window)
            if still_wanted is not None and not still_wanted():
                raise CommitAbandoned(window.name)
            return freed

    def clone_window(self, source: pb.WindowInfo, clone: pb.WindowInfo) -> list[bytes]:
        """Insert `clone`, sharing every chunk of `source`; returns the digests freed by
        dropping an expired window of the clone's name (for the caller to collect)."""
        with self.transaction():
            if self.window_exists(clone.tenant, clone.name):
                raise WindowExists(clone.name)
            if not self.window_exists(source.tenant, source.name):
                raise WindowGone(source.name)
            counts = Counter(ref.digest for ref in source.chunks)
            self._db.executemany(
                "UPDATE chunks SET refcount = refcount + ? WHERE tenant=? AND digest=?",
                [(count, clone.tenant, digest) for digest, count in counts.items()],
            )
            freed = []
            if self.window_exists(clone.tenant, clone.name, include_expired=True):
                freed = self._drop_window(clone.tenant, clone.name)
            self._insert_window(clone)
            return freed

    def delete_window(self, tenant: str, name: str) -> list[tuple[bytes, int]] | None:
        """Drop a window; returns (digest, stored_size) of chunks it freed, None if absent."""
        with self.transaction():
            if not self.window_exists(tenant, name):
                return None
            return self._drop_window_with_sizes(tenant, name)

    def insert_chunk_row(self, tenant: str, row: ChunkRow) -> None:
        """fsck's repair: give an intact chunk file that windows reference its missing row."""
        self._db.execute(
            "INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?, ?, ?)",
            (tenant, row.digest, row.refcount, row.raw_size, row.stored_size, row.codec),
        )

    def set_refcount(self, tenant: str, digest: bytes, refcount: int) -> None:
        """fsck's repair: make a row's count what the windows say (0 removes the row)."""
        with self.transaction():
            if refcount <= 0:
                self._db.execute("DELETE FROM chunks WHERE tenant=? AND digest=?", (tenant, digest))
            else:
                self._db.execute(
                    "UPDATE chunks SET refcount=? WHERE tenant=? AND digest=?",
                    (refcount, tenant, digest),
                )

    # -- TTLs and quotas (housekeeping/ttl.py, quotas.py) ---------------------------------
    # A window whose `expires_at` column is in the past is invisible (get, list, exists,
    # delete, clone and a thaw answer as if it were absent) until the collector deletes it;
    # a pinned window's column is NULL, so it never expires.

    def expired_windows(
        self, now: float, limit: int = 100, tenant: str | None = None
    ) -> list[tuple[str, str]]:
        """(tenant, name) of up to `limit` windows that expired at or before `now`,
        soonest-expired first; only `tenant`'s if given (a quota check must find its own
        tenant's expired windows whatever other tenants hold, and look at nothing else)."""
        if tenant is not None:
            rows = self._db.execute(
                "SELECT tenant, name FROM windows WHERE tenant=? AND expires_at IS NOT NULL "
                "AND expires_at <= ? ORDER BY expires_at LIMIT ?",
                (tenant, now, limit),
            ).fetchall()
        else:
            rows = self._db.execute(
                "SELECT tenant, name FROM windows WHERE expires_at IS NOT NULL "
                "AND expires_at <= ? ORDER BY expires_at LIMIT ?",
                (now, limit),
            ).fetchall()
        return [(owner, name) for owner, name in rows]

    def tenant_usage(self, tenant: str) -> Usage:
        """What `tenant` holds: windows (expired ones not yet collected included), distinct
        chunks and their raw and stored bytes (each chunk once, however many windows or
        keys share it)."""
        (windows,) = self._db.execute(
            "SELECT count(*) FROM windows WHERE tenant=?", (tenant,)
        ).fetchone()
        chunks, raw, stored = self._db.execute(
            "SELECT count(*), coalesce(sum(raw_size), 0), coalesce(sum(stored_size), 0) "
            "FROM chunks WHERE tenant=?",
            (tenant,),
        ).fetchone()
        return Usage(windows=windows, chunks=chunks, raw_bytes=raw, stored_bytes=stored)

    def delete_expired_window(
        self, tenant: str, name: str, now: float
    ) -> list[tuple[bytes, int]] | None:
        """`delete_window` for the collector: drops the window only if it is still expired
        at `now` (a fresh window of the same name may have replaced it meanwhile); returns
        (digest, stored_size) of the chunks freed, None if there was nothing to drop."""
        with self.transaction():
            row = self._db.execute(
                "SELECT 1 FROM windows WHERE tenant=? AND name=? AND expires_at IS NOT NULL "
                "AND expires_at <= ?",
                (tenant, name, now),
            ).fetchone()
            if row is None:
                return None
            return self._drop_window_with_sizes(tenant, name)

    def _any_window(self, tenant: str, name: str) -> pb.WindowInfo | None:
        """The window's row whether or not it has expired."""
        row = self._db.execute(
            "SELECT full FROM windows WHERE tenant=? AND name=?", (tenant, name)
        ).fetchone()
        return None if row is None else pb.WindowInfo.FromString(row[0])

    # -- Redis copies still to delete (housekeeping/collector.py, LocalCollector) ----------
    # A chunk collected while Redis was away (or refusing) lost its row and its local file
    # but not its Redis copy. Its digest waits here, in the catalog's own durable file, until
    # the sweeper finds Redis again and the collector deletes the copy (unless the chunk got
    # a row again meanwhile: then the copy is the chunk's and stays).

    def add_redis_pending(self, tenant: str, digests: Iterable[bytes]) -> None:
        with self.transaction():
            self._db.executemany(
                "INSERT OR IGNORE INTO redis_pending_deletes VALUES (?, ?, ?)",
                [(tenant, d, time.time()) for d in digests],
            )

    def redis_pending(self, limit: int = 1000) -> list[tuple[str, bytes]]:
        """(tenant, digest) of up to `limit` Redis copies waiting to be deleted, oldest first."""
        rows = self._db.execute(
            "SELECT tenant, digest FROM redis_pending_deletes ORDER BY since LIMIT ?", (limit,)
        ).fetchall()
        return [(tenant, bytes(digest)) for tenant, digest in rows]

    def drop_redis_pending(self, items: Iterable[tuple[str, bytes]]) -> None:
        with self.transaction():
            self._db.executemany(
                "DELETE FROM redis_pending_deletes WHERE tenant=? AND digest=?", list(items)
            )

    # -- internals ----------------------------------------------------------------------

    def _insert_window(self, window: pb.WindowInfo) -> None:
        # The column holds when the window stops being visible: never for a pinned one.
        expires = (
            window.expires_at.seconds + window.expires_at.nanos / 1e9
            if window.HasField("expires_at") and not window.pinned
            else None
        )
        self._db.execute(
            "INSERT INTO windows VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                window.tenant,
                window.name,
                window.session_id,
                window.fingerprint.model_id,
                window.description,
                window.created_at.seconds + window.created_at.nanos / 1e9,
                expires,
                basic_view(window).SerializeToString(),
                window.SerializeToString(),
            ),
        )

    def _drop_window_with_sizes(self, tenant: str, name: str) -> list[tuple[bytes, int]]:
        """`_drop_window`, with the stored size of each chunk it freed (read first)."""
        window = self._any_window(tenant, name)
        assert window is not None
        sizes = {}
        for ref in window.chunks:
            row = self.chunk(tenant, ref.digest)
            if row is not None:
                sizes[ref.digest] = row.stored_size
        return [(d, sizes.get(d, 0)) for d in self._drop_window(tenant, name)]

    def _drop_window(self, tenant: str, name: str) -> list[bytes]:
        window = self._any_window(tenant, name)
        assert window is not None
        self._db.execute("DELETE FROM windows WHERE tenant=? AND name=?", (tenant, name))
        counts = Counter(ref.digest for ref in window.chunks)
        return [d for d, n in counts.items() if release_chunk(self._db, tenant, d, n)]


class Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._db.execute("COMMIT")
        else:
            self._db.execute("ROLLBACK")


def release_chunk(db: sqlite3.Connection, tenant: str, digest: bytes, count: int) -> bool:
    """Drop `count` references on a chunk row; True if that was its last (row deleted)."""
    gone = db.execute(
        "DELETE FROM chunks WHERE tenant=? AND digest=? AND refcount <= ?",
        (tenant, digest, count),
    ).rowcount
    if gone:
        return True
    db.execute(
        "UPDATE chunks SET refcount = refcount - ? WHERE tenant=? AND digest=?",
        (count, tenant, digest),
    )
    return False
