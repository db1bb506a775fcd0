"""Start-up recovery: remove what a crash left behind before the manager serves.

A chunk file gets its catalog row only in the transaction that commits a window, so a file
without a row belongs to a stream that never committed; temp files belong to writes that
never finished. Both go. The manager holds the data dir's lock while this runs, so no
other manager's in-flight files can be taken for leftovers.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from cwm_client.errors import Unavailable
from cwm_server.manager.catalog.base import WindowCatalog
from cwm_server.manager.housekeeping.collector import Collector
from cwm_server.manager.tiers.disk import DiskTier

log = structlog.get_logger("cwm.recovery")


@dataclass(frozen=True)
class RecoveryReport:
    temp_files_removed: int
    orphan_chunks_removed: int


def recover(disk: DiskTier, catalog: WindowCatalog, collector: Collector) -> RecoveryReport:
    """Remove temp files and chunk files no window commits (and, through the collector,
    what else such a chunk left, e.g. its Redis copy beside a local catalog). With the
    shared catalog away, the chunk files stay for a later start."""
    temp = disk.remove_temp_files()
    orphans = 0
    try:
        for tenant, digest, path in list(disk.iter_chunks()):
            if catalog.chunk(tenant, digest) is None:
                path.unlink(missing_ok=True)
                orphans += 1
                collector.orphan_file_removed(tenant, digest)
    except Unavailable as exc:  # the shared catalog is away: keep the files for now
        log.warning("recover_orphans_skipped", detail=str(exc))
    report = RecoveryReport(temp_files_removed=temp, orphan_chunks_removed=orphans)
    log.info("recovered", temp_files=temp, orphan_chunks=orphans)
    return report
