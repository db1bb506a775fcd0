"""The window catalog in SQLite (WAL): windows, and reference counts of the chunks they use.

A window row and the reference counts of all its chunks change in one transaction, which is
what makes a commit atomic and a clone O(1) in bytes. Only one thread uses the connection
(the manager runs every call on a single-worker executor), so there is no locking here.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cwm_client import pb
from cwm_server.manager.quotas import Usage

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
        self._db.executescript(KEYED_SCHEMA)
        self._db.executescript(TTL_SCHEMA)
        self._db.executescript(REDIS_PENDING_SCHEMA)
        self._unexpire_pinned()

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
        with self._transaction():
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
            freed = []
            if self.window_exists(clone.tenant, clone.name, include_expired=True):
                freed = self._drop_window(clone.tenant, clone.name)
            self._insert_window(clone)
            return freed

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

    # == TTLs and quotas (ttl_collector.py, quotas.py) ====================================
    # A window whose `expires_at` column is in the past is invisible (get, list, exists,
    # delete, clone and a thaw answer as if it were absent) until the collector deletes it;
    # a pinned window's column is NULL, so it never expires. A Redis catalog implements
    # the same three methods with the same meaning.

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
        with self._transaction():
            row = self._db.execute(
                "SELECT 1 FROM windows WHERE tenant=? AND name=? AND expires_at IS NOT NULL "
                "AND expires_at <= ?",
                (tenant, name, now),
            ).fetchone()
            if row is None:
                return None
            window = self._any_window(tenant, name)
            assert window is not None
            sizes = {}
            for ref in window.chunks:
                chunk = self.chunk(tenant, ref.digest)
                if chunk is not None:
                    sizes[ref.digest] = chunk.stored_size
            freed = self._drop_window(tenant, name)
            return [(d, sizes.get(d, 0)) for d in freed]

    def _unexpire_pinned(self) -> None:
        """Catalogs written before TTLs were enforced kept an expiry for pinned windows
        too; a pinned window never expires, so clear it (once: later inserts store none)."""
        rows = self._db.execute(
            "SELECT tenant, name, basic FROM windows WHERE expires_at IS NOT NULL"
        ).fetchall()
        pinned = [(t, n) for t, n, blob in rows if pb.WindowInfo.FromString(blob).pinned]
        if pinned:
            with self._transaction():
                self._db.executemany(
                    "UPDATE windows SET expires_at = NULL WHERE tenant=? AND name=?", pinned
                )

    def _any_window(self, tenant: str, name: str) -> pb.WindowInfo | None:
        """The window's row whether or not it has expired."""
        row = self._db.execute(
            "SELECT full FROM windows WHERE tenant=? AND name=?", (tenant, name)
        ).fetchone()
        return None if row is None else pb.WindowInfo.FromString(row[0])

    # == end of TTLs and quotas ===========================================================

    # == Redis copies still to delete (a Redis tier beside this catalog; windows.py) ======
    # A chunk collected while Redis was away (or refusing) lost its row and its local file
    # but not its Redis copy. Its digest waits here, in the catalog's own durable file, until
    # the health check finds Redis again and the manager deletes the copy (unless the chunk
    # got a row again meanwhile: then the copy is the chunk's and stays).

    def add_redis_pending(self, tenant: str, digests: Iterable[bytes]) -> None:
        with self._transaction():
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
        with self._transaction():
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

    def _drop_window(self, tenant: str, name: str) -> list[bytes]:
        window = self._any_window(tenant, name)
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


# == Keyed chunks (KeyedChunkService, cwm_server/manager/keyed.py) ==========================
# A key row names one chunk by an opaque key (LMCache's CacheEngineKey string) and holds one
# reference on that chunk's row in `chunks`, exactly as each use by a window does: a chunk
# that keys and windows share is collected only when the last of them is gone.

KEYED_SCHEMA = """
CREATE TABLE IF NOT EXISTS keyed_chunks (
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,
    digest BLOB NOT NULL,
    raw_size INTEGER NOT NULL,
    metadata BLOB NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (tenant, key)
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class KeyRow:
    key: str
    digest: bytes
    raw_size: int
    metadata: bytes
    created_at: float
    stored_size: int = 0


@dataclass(frozen=True)
class NewKey:
    """A key a put stores, with the chunk holding its value."""

    key: str
    digest: bytes
    raw_size: int
    metadata: bytes


def _keyed_has_table(db: sqlite3.Connection) -> bool:
    row = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='keyed_chunks'"
    ).fetchone()
    return row is not None


_KEY_COLUMNS = (
    "SELECT k.key, k.digest, k.raw_size, k.metadata, k.created_at, "
    "coalesce(c.stored_size, 0) FROM keyed_chunks k LEFT JOIN chunks c "
    "ON c.tenant = k.tenant AND c.digest = k.digest"
)


class KeyedCatalog:
    """The key rows, on the same connection and transactions as the `Catalog` they extend
    (so a key and a window change chunk references in one transaction when they must)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._db = catalog._db

    def get_keys(self, tenant: str, keys: Iterable[str]) -> dict[str, KeyRow]:
        found: dict[str, KeyRow] = {}
        for key in keys:
            row = self._db.execute(
                f"{_KEY_COLUMNS} WHERE k.tenant=? AND k.key=?", (tenant, key)
            ).fetchone()
            if row is not None:
                found[key] = KeyRow(*row)
        return found

    def contains_prefix(self, tenant: str, keys: Iterable[str]) -> int:
        present = 0
        for key in keys:
            if not self.key_exists(tenant, key):
                break
            present += 1
        return present

    def key_exists(self, tenant: str, key: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM keyed_chunks WHERE tenant=? AND key=?", (tenant, key)
        ).fetchone()
        return row is not None

    def list_keys(self, tenant: str, *, after: str, key_prefix: str, limit: int) -> list[KeyRow]:
        sql = [f"{_KEY_COLUMNS} WHERE k.tenant=? AND k.key>?"]
        args: list[object] = [tenant, after]
        if key_prefix:
            sql.append("AND substr(k.key, 1, ?) = ?")
            args += [len(key_prefix), key_prefix]
        sql.append("ORDER BY k.key LIMIT ?")
        args.append(limit)
        return [KeyRow(*row) for row in self._db.execute(" ".join(sql), args).fetchall()]

    def put_keys(
        self,
        tenant: str,
        entries: list[NewKey],
        new_chunks: dict[bytes, NewChunk],
        created_at: float,
    ) -> list[bytes]:
        """Store key rows (overwriting), each taking a reference on its chunk, atomically.

        A chunk without a row gets one from `new_chunks` (KeyError if absent: the caller
        makes sure every value's chunk is stored). Returns the digests of chunks that lost
        their last reference through an overwrite, for the caller to collect."""
        freed: list[bytes] = []
        with self.catalog._transaction():
            for entry in entries:
                updated = self._db.execute(
                    "UPDATE chunks SET refcount = refcount + 1 WHERE tenant=? AND digest=?",
                    (tenant, entry.digest),
                ).rowcount
                if not updated:
                    new = new_chunks[entry.digest]
                    self._db.execute(
                        "INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?)",
                        (tenant, entry.digest, 1, new.raw_size, new.stored_size, new.codec),
                    )
                old = self._db.execute(
                    "SELECT digest FROM keyed_chunks WHERE tenant=? AND key=?",
                    (tenant, entry.key),
                ).fetchone()
                if old is not None and _release_chunk(self._db, tenant, old[0], 1):
                    freed.append(old[0])
                self._db.execute(
                    "INSERT OR REPLACE INTO keyed_chunks VALUES (?, ?, ?, ?, ?, ?)",
                    (tenant, entry.key, entry.digest, entry.raw_size, entry.metadata, created_at),
                )
        return freed

    def delete_keys(self, tenant: str, keys: Iterable[str]) -> tuple[int, list[tuple[bytes, int]]]:
        """Drop key rows; returns how many existed and (digest, stored_size) of chunks
        freed."""
        deleted = 0
        freed: list[tuple[bytes, int]] = []
        with self.catalog._transaction():
            for key in dict.fromkeys(keys):
                row = self._db.execute(
                    "SELECT digest FROM keyed_chunks WHERE tenant=? AND key=?", (tenant, key)
                ).fetchone()
                if row is None:
                    continue
                digest = row[0]
                chunk = self.catalog.chunk(tenant, digest)
                self._db.execute("DELETE FROM keyed_chunks WHERE tenant=? AND key=?", (tenant, key))
                deleted += 1
                if _release_chunk(self._db, tenant, digest, 1):
                    freed.append((digest, chunk.stored_size if chunk is not None else 0))
        return deleted, freed

    def iter_refs(self) -> Iterator[tuple[str, str, bytes, int]]:
        """(tenant, key, digest, raw_size) of every key row: fsck counts them as
        references (a catalog opened read-only before the table existed has none)."""
        if not _keyed_has_table(self._db):
            return
        yield from self._db.execute(
            "SELECT tenant, key, digest, raw_size FROM keyed_chunks ORDER BY tenant, key"
        ).fetchall()


def _release_chunk(db: sqlite3.Connection, tenant: str, digest: bytes, count: int) -> bool:
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


# == TTLs and quotas: schema and the "not expired" condition ================================

TTL_SCHEMA = """
CREATE INDEX IF NOT EXISTS windows_by_expiry ON windows (expires_at)
    WHERE expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS windows_by_tenant_expiry ON windows (tenant, expires_at)
    WHERE expires_at IS NOT NULL;
"""

LIVE = "(expires_at IS NULL OR expires_at > ?)"
"""SQL condition on `windows`: not expired at the time bound to its one parameter."""

REDIS_PENDING_SCHEMA = """
CREATE TABLE IF NOT EXISTS redis_pending_deletes (
    tenant TEXT NOT NULL,
    digest BLOB NOT NULL,
    since REAL NOT NULL,
    PRIMARY KEY (tenant, digest)
) WITHOUT ROWID;
"""
