"""`cwm fsck`: check (and repair) a manager's data dir offline.

What is checked:

- every chunk a window references has a catalog row and a file under its content address
  whose header is sound, that decodes, and whose bytes match the digest;
- each chunk row's refcount equals the number of references windows hold on it, and no
  row is left without references;
- every window's own metadata is consistent (token and chunk counts, chunk order and spans);
- no chunk file exists without a row (an orphan), no temp file is left from a crash, and
  nothing else sits under ``chunks/`` (a warning only: such files are left alone).

Reads use one read-only SQLite snapshot, so the check may run beside a live manager; files
younger than `IN_FLIGHT_GRACE_SECONDS` are then taken for in-flight writes, not problems,
and every finding is re-checked against the live catalog before it is reported.

`repair` (only with no manager running) deletes orphan and temp files, fixes refcounts,
recreates a missing row when the chunk's file is intact and drops rows nothing references.
It never deletes a window: windows whose chunks are missing or corrupt are reported as
unrecoverable, for a person to decide about.
"""

from cwm_server.fsck.checker import IN_FLIGHT_GRACE_SECONDS
from cwm_server.fsck.report import (
    BAD_WINDOW,
    CORRUPT,
    MISSING_FILE,
    MISSING_ROW,
    ORPHAN_FILE,
    REFCOUNT,
    STRAY_FILE,
    TEMP_FILE,
    UNREFERENCED_ROW,
    UNVERIFIABLE,
    FsckReport,
    Problem,
)
from cwm_server.fsck.run import FsckError, catalog_in_use, run_fsck

__all__ = [
    "BAD_WINDOW",
    "CORRUPT",
    "IN_FLIGHT_GRACE_SECONDS",
    "MISSING_FILE",
    "MISSING_ROW",
    "ORPHAN_FILE",
    "REFCOUNT",
    "STRAY_FILE",
    "TEMP_FILE",
    "UNREFERENCED_ROW",
    "UNVERIFIABLE",
    "FsckError",
    "FsckReport",
    "Problem",
    "catalog_in_use",
    "run_fsck",
]
