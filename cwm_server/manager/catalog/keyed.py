"""Keyed chunks (KeyedChunkService, `cwm_server/manager/keyed/`) in the SQLite catalog.

A key row names one chunk by an opaque key (LMCache's CacheEngineKey string) and holds one
reference on that chunk's row in `chunks`, exactly as each use by a window does: a chunk
that keys and windows share is collected only when the last of them is gone. Only the
embedded SQLite catalog has key rows (a manager with the shared Redis catalog answers
KeyedChunkService with FAILED_PRECONDITION).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from cwm_server.manager.catalog.base import NewChunk
from cwm_server.manager.catalog.sqlite import SqliteCatalog, release_chunk
from cwm_server.manager.catalog.sqlite_schema import has_keyed_table


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


_KEY_COLUMNS = (
    "SELECT k.key, k.digest, k.raw_size, k.metadata, k.created_at, "
    "coalesce(c.stored_size, 0) FROM keyed_chunks k LEFT JOIN chunks c "
    "ON c.tenant = k.tenant AND c.digest = k.digest"
)


class KeyedCatalog:
    """The key rows, on the same connection and transactions as the `SqliteCatalog` they
    extend (so a key and a window change chunk references in one transaction when they
    must)."""

    def __init__(self, catalog: SqliteCatalog) -> None:
        self.catalog = catalog
        self._db = catalog.connection

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
        with self.catalog.transaction():
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
                if old is not None and release_chunk(self._db, tenant, old[0], 1):
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
        with self.catalog.transaction():
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
                if release_chunk(self._db, tenant, digest, 1):
                    freed.append((digest, chunk.stored_size if chunk is not None else 0))
        return deleted, freed

    def iter_refs(self) -> Iterator[tuple[str, str, bytes, int]]:
        """(tenant, key, digest, raw_size) of every key row: fsck counts them as
        references (a catalog opened read-only before the table existed has none)."""
        if not has_keyed_table(self._db):
            return
        yield from self._db.execute(
            "SELECT tenant, key, digest, raw_size FROM keyed_chunks ORDER BY tenant, key"
        ).fetchall()
