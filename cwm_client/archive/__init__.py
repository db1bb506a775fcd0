"""Portable single-file window archives (`cwm export` / `cwm import`).

An archive is a plain, uncompressed POSIX tar holding, in this order:

- ``manifest.pb``: the window's `pb.WindowInfo`, FULL view (token ids and chunk refs);
- ``manifest.json``: format name and version, the BLAKE3 of ``manifest.pb`` and a
  human-readable summary of the window;
- ``chunks/<index:06d>-<digest hex>.bin``: the raw canonical bytes of every chunk, in index
  order.

Nothing is held whole in memory: export writes one thawed chunk at a time, import reads a
chunk from the tar only when the freeze stream sends it (chunks the manager already holds
are never read) and checks its BLAKE3 digest before a byte of it leaves the process. A
damaged archive raises `DataLoss` naming the chunk, and the freeze is abandoned, so the
manager commits nothing.
"""

from cwm_client.archive.importer import ImportResult, import_window, remaining_ttl
from cwm_client.archive.layout import (
    CHUNK_DIR,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_JSON,
    MANIFEST_PB,
    chunk_member_name,
    manifest_summary,
)
from cwm_client.archive.reader import ArchiveChunk, ArchiveReader, read_archive
from cwm_client.archive.writer import ArchiveStats, ExportResult, export_window, write_archive

__all__ = [
    "CHUNK_DIR",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_JSON",
    "MANIFEST_PB",
    "ArchiveChunk",
    "ArchiveReader",
    "ArchiveStats",
    "ExportResult",
    "ImportResult",
    "chunk_member_name",
    "export_window",
    "import_window",
    "manifest_summary",
    "read_archive",
    "remaining_ttl",
    "write_archive",
]
