"""The window catalog in SQLite (WAL): windows, and reference counts of the chunks they use.

A window row and the reference counts of all its chunks change in one transaction, which is
what makes a commit atomic and a clone O(1) in bytes. Only one thread uses the connection
(the manager runs every call on a single-worker executor), so there is no locking here.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cwm_client import pb

SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    session_id TEXT NOT NULL,
    model_id TEXT NOT NULL,
    description TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    basic BLOB NOT NULL,
    full BLOB NOT NULL,
    PRIMARY KEY (tenant, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks (
    tenant TEXT NOT NULL,
    digest BLOB NOT NULL,
    refcount INTEGER NOT NULL CHECK (refcount > 0),
    raw_size INTEGER NOT NULL,
    stored_size INTEGER NOT NULL,
    codec INTEGER NOT NULL,
    PRIMARY KEY (tenant, digest)
) WITHOUT ROWID;
"""


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


def basic_view(full: pb.WindowInfo) -> pb.WindowInfo:
    basic = pb.WindowInfo()
    basic.CopyFrom(full)
    basic.ClearField("token_ids")
    basic.ClearField("chunks")
    return basic


class Catalog:
    def __init__(self, path: Path, read_only: bool = False) -> None:
        """`read_only` opens an existing catalog for checks (fsck beside a live manager)."""
        if read_only:
            self._db = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
            )
            return
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

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
            f"SELECT {column} FROM windows WHERE tenant=? AND name=?", (tenant, name)
        ).fetchone()
        return None if row is None else pb.WindowInfo.FromString(row[0])

    def window_exists(self, tenant: str, name: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM windows WHERE tenant=? AND name=?", (tenant, name)
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
        sql = [f"SELECT {column} FROM windows WHERE tenant=? AND name>?"]
        args: list[object] = [tenant, after]
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
        with self._transaction():
            exists = self.window_exists(tenant, window.name)
            if exists and not replace:
                raise WindowExists(window.name)
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

    def clone_window(self, source: pb.WindowInfo, clone: pb.WindowInfo) -> None:
        with self._transaction():
            if self.window_exists(clone.tenant, clone.name):
                raise WindowExists(clone.name)
            if not self.window_exists(source.tenant, source.name):
                raise WindowGone(source.name)
            counts = Counter(ref.digest for ref in source.chunks)
            self._db.executemany(
                "UPDATE chunks SET refcount = refcount + ? WHERE tenant=? AND digest=?",
                [(count, clone.tenant, digest) for digest, count in counts.items()],
            )
            self._insert_window(clone)

    def delete_window(self, tenant: str, name: str) -> list[tuple[bytes, int]] | None:
        """Drop a window; returns (digest, stored_size) of chunks it freed, None if absent."""
        with self._transaction():
            if not self.window_exists(tenant, name):
                return None
            sizes = {}
            window = self.get_window(tenant, name)
            assert window is not None
            for ref in window.chunks:
                row = self.chunk(tenant, ref.digest)
                if row is not None:
                    sizes[ref.digest] = row.stored_size
            freed = self._drop_window(tenant, name)
            return [(d, sizes.get(d, 0)) for d in freed]

    def insert_chunk_row(self, tenant: str, row: ChunkRow) -> None:
        """fsck's repair: give an intact chunk file that windows reference its missing row."""
        self._db.execute(
            "INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?, ?, ?)",
            (tenant, row.digest, row.refcount, row.raw_size, row.stored_size, row.codec),
        )

    def set_refcount(self, tenant: str, digest: bytes, refcount: int) -> None:
        """fsck's repair: make a row's count what the windows say (0 removes the row)."""
        with self._transaction():
            if refcount <= 0:
                self._db.execute("DELETE FROM chunks WHERE tenant=? AND digest=?", (tenant, digest))
            else:
                self._db.execute(
                    "UPDATE chunks SET refcount=? WHERE tenant=? AND digest=?",
                    (refcount, tenant, digest),
                )

    # -- internals ----------------------------------------------------------------------

    def _insert_window(self, window: pb.WindowInfo) -> None:
        expires = (
            window.expires_at.ToDatetime().timestamp() if window.HasField("expires_at") else None
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

    def _drop_window(self, tenant: str, name: str) -> list[bytes]:
        window = self.get_window(tenant, name)
        assert window is not None
        self._db.execute("DELETE FROM windows WHERE tenant=? AND name=?", (tenant, name))
        freed = []
        for digest, count in Counter(ref.digest for ref in window.chunks).items():
            gone = self._db.execute(
                "DELETE FROM chunks WHERE tenant=? AND digest=? AND refcount <= ?",
                (tenant, digest, count),
            ).rowcount
            if gone:
                freed.append(digest)
            else:
                self._db.execute(
                    "UPDATE chunks SET refcount = refcount - ? WHERE tenant=? AND digest=?",
                    (count, tenant, digest),
                )
        return freed

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._db.execute("COMMIT")
        else:
            self._db.execute("ROLLBACK")


class WindowExists(Exception):
    """A window of that name exists (and the request did not ask to replace it)."""


class CommitAbandoned(Exception):
    """The stream behind a commit ended (cancelled) before the transaction committed."""


class WindowGone(Exception):
    """The window disappeared between reading it and changing the catalog."""
