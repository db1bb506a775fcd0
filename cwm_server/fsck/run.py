"""Running `cwm fsck`: find out whether a manager has the catalog open, then check (and,
with no manager running, repair) the data dir."""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

from cwm_server.fsck.checker import CATALOG_FILE, Checker, Progress
from cwm_server.fsck.report import FsckReport
from cwm_server.manager.tiers.sealing import KeyFileError, Keyring

_SQLITE_SHM_DMS_BYTE = 128
"""SQLite's "dead man switch" byte in the -shm file: every open connection holds a read
lock on it for as long as it is open (os_unix.c, UNIX_SHM_DMS)."""


class FsckError(Exception):
    """The check could not run (no data dir, no catalog, a manager in the way of repair)."""


def catalog_in_use(data_dir: Path) -> bool:
    """True if another process has the catalog open (a running manager).

    Asks the kernel with F_GETLK, which changes no lock, whether another process holds
    SQLite's dead-man-switch lock in the -shm file. Call it before this process opens the
    catalog itself: closing any descriptor of a file drops this process's POSIX locks on it.
    """
    shm = data_dir / f"{CATALOG_FILE}-shm"
    try:
        fd = os.open(shm, os.O_RDONLY)
    except FileNotFoundError:
        return False  # the last connection to close removes the -shm file
    try:
        query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, _SQLITE_SHM_DMS_BYTE, 1, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
        lock_type = struct.unpack("hhqqi4x", answer)[0]
        return bool(lock_type != fcntl.F_UNLCK)
    finally:
        os.close(fd)


def run_fsck(
    data_dir: str | os.PathLike[str],
    *,
    repair: bool = False,
    progress: Progress | None = None,
    key_file: str | os.PathLike[str] | None = None,
) -> FsckReport:
    """Check the manager data dir `data_dir`; with `repair`, fix what can be fixed.

    `key_file`: the manager's --key-file, so chunks sealed with its keys are decrypted and
    verified; without it (or without a chunk's key) such chunks are reported as warnings
    (unverifiable), not as corrupt. A key file that cannot be read raises FsckError.

    Raises FsckError if there is nothing to check, or if `repair` is asked while a manager
    has the catalog open. Call it from a process that does not itself have this data dir's
    catalog open (the CLI, or a test whose manager is another process).
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FsckError(f"{root} is not a directory")
    if not (root / CATALOG_FILE).is_file():
        raise FsckError(f"{root} holds no {CATALOG_FILE}: it is not a cwm manager data dir")
    running = catalog_in_use(root)
    if repair and running:
        raise FsckError(
            f"a manager has {root / CATALOG_FILE} open; stop it before `cwm fsck --repair` "
            "(checking without --repair is safe while it runs)"
        )
    keyring = None
    if key_file is not None:
        try:
            keyring = Keyring.load(Path(key_file).expanduser())
        except KeyFileError as exc:
            raise FsckError(str(exc)) from None
    checker = Checker(root, repair=repair, running=running, progress=progress, keyring=keyring)
    try:
        return checker.run()
    finally:
        checker.close()
