"""A few MiB of the data dir's filesystem held back, so that a delete works on a full disk.

Deleting a window writes to the catalog (SQLite appends to its write-ahead log) before any
chunk file goes, so on a disk filled by something else the delete that would free space
fails like everything else. The manager keeps `RESERVE_BYTES` allocated in one file, as
databases do; a delete that meets a full disk releases it and tries again, and the reserve
is taken back once a delete has freed the space.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import structlog

log = structlog.get_logger("cwm.space")

RESERVE_BYTES = 16 << 20
FILE_NAME = "space.reserve"


class SpaceReserve:
    def __init__(self, data_dir: Path, size: int = RESERVE_BYTES) -> None:
        self.path = Path(data_dir) / FILE_NAME
        self.size = size
        self._lock = threading.Lock()

    @property
    def held(self) -> bool:
        try:
            return self.path.stat().st_size >= self.size
        except FileNotFoundError:
            return False

    def ensure(self) -> bool:
        """Hold the reserve (allocated, not sparse); False where the disk has no room for it
        now (it is tried again later)."""
        with self._lock:
            if self.held:
                return True
            tmp = self.path.with_suffix(".tmp")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    os.posix_fallocate(fd, 0, self.size)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, self.path)
            except OSError:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                return False
            return True

    def release(self) -> bool:
        """Give the reserve back to the filesystem; whether there was one."""
        with self._lock:
            try:
                self.path.unlink()
            except FileNotFoundError:
                return False
        log.warning(
            "space_reserve_released",
            path=str(self.path),
            mib=self.size >> 20,
            why="the disk is full; a delete needs room to record itself",
        )
        return True
