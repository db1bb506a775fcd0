"""The SQLite catalog's file: its tables, indexes, the "not expired" condition, and opening
it (creating what a catalog written by an older manager lacks, and bringing its rows up to
what this one expects).

Every statement here is idempotent (`IF NOT EXISTS`, updates that change nothing the second
time), so opening a catalog is also its migration.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from cwm_client import pb

WINDOWS_SCHEMA = """
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
"""Key rows of KeyedChunkService (`keyed.KeyedCatalog`): each holds one reference on its
chunk's row in `chunks`, exactly as each use by a window does."""

TTL_SCHEMA = """
CREATE INDEX IF NOT EXISTS windows_by_expiry ON windows (expires_at)
    WHERE expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS windows_by_tenant_expiry ON windows (tenant, expires_at)
    WHERE expires_at IS NOT NULL;
"""

REDIS_PENDING_SCHEMA = """
CREATE TABLE IF NOT EXISTS redis_pending_deletes (
    tenant TEXT NOT NULL,
    digest BLOB NOT NULL,
    since REAL NOT NULL,
    PRIMARY KEY (tenant, digest)
) WITHOUT ROWID;
"""
"""Redis copies of chunks collected while Redis was away (a local catalog beside a Redis
tier): kept in the catalog's own durable file until they are deleted."""

LIVE = "(expires_at IS NULL OR expires_at > ?)"
"""SQL condition on `windows`: not expired at the time bound to its one parameter."""


def open_catalog_file(path: Path, read_only: bool) -> sqlite3.Connection:
    """The catalog's connection; `read_only` opens an existing file for checks (fsck
    beside a live manager) and changes nothing in it."""
    if read_only:
        return sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro",
            uri=True,
            isolation_level=None,
            check_same_thread=False,
        )
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(WINDOWS_SCHEMA)
    db.executescript(KEYED_SCHEMA)
    db.executescript(TTL_SCHEMA)
    db.executescript(REDIS_PENDING_SCHEMA)
    _unexpire_pinned(db)
    return db


def has_keyed_table(db: sqlite3.Connection) -> bool:
    """Whether the file has key rows at all (one opened read-only may predate them)."""
    row = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='keyed_chunks'"
    ).fetchone()
    return row is not None


def _unexpire_pinned(db: sqlite3.Connection) -> None:
    """Catalogs written before TTLs were enforced kept an expiry for pinned windows too; a
    pinned window never expires, so clear it (once: later inserts store none)."""
    rows = db.execute("SELECT tenant, name, basic FROM windows WHERE expires_at IS NOT NULL")
    pinned = [(t, n) for t, n, blob in rows.fetchall() if pb.WindowInfo.FromString(blob).pinned]
    if pinned:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("UPDATE windows SET expires_at = NULL WHERE tenant=? AND name=?", pinned)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
