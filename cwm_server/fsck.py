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

from __future__ import annotations

import fcntl
import os
import struct
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cwm_client import pb
from cwm_client.chunks import DTYPE_SIZE, chunk_raw_size, token_spans
from cwm_client.chunks import digest as blake3_digest
from cwm_client.codecs import decode
from cwm_server.manager.catalog.sqlite import Catalog, ChunkRow, KeyedCatalog
from cwm_server.manager.tiers.disk import (
    HEADER_SIZE,
    TMP_SUFFIX,
    ChunkFileCorrupt,
    ChunkFileMissing,
    DiskTier,
    StoredChunk,
)
from cwm_server.manager.tiers.memory import MemoryTier
from cwm_server.manager.tiers.sealing import (
    KeyFileError,
    Keyring,
    KeyUnavailable,
    SealBroken,
    is_sealed,
    parse_envelope,
    plain_codec,
)
from cwm_server.manager.tiers.store import ChunkStore

CATALOG_FILE = "catalog.sqlite"
IN_FLIGHT_GRACE_SECONDS = 300.0
"""With a manager running, chunk and temp files younger than this may belong to a freeze
that has not committed yet; they are counted as in flight, not reported."""

_SQLITE_SHM_DMS_BYTE = 128
"""SQLite's "dead man switch" byte in the -shm file: every open connection holds a read
lock on it for as long as it is open (os_unix.c, UNIX_SHM_DMS)."""

Progress = Callable[[int, int], None]

# Problem kinds: stable strings, scripts read them from `--json`.
MISSING_FILE = "missing_file"
CORRUPT = "corrupt"
MISSING_ROW = "missing_row"
REFCOUNT = "refcount"
UNREFERENCED_ROW = "unreferenced_row"
BAD_WINDOW = "bad_window"
ORPHAN_FILE = "orphan_file"
TEMP_FILE = "temp_file"
STRAY_FILE = "stray_file"
UNVERIFIABLE = "unverifiable"
"""A warning: a chunk sealed with a key fsck was not given (encryption at rest)."""


class FsckError(Exception):
    """The check could not run (no data dir, no catalog, a manager in the way of repair)."""


@dataclass
class Problem:
    kind: str
    message: str
    tenant: str = ""
    window: str = ""
    key: str = ""
    """Set instead of `window` when the chunk's user is a key (KeyedChunkService)."""
    chunk_index: int | None = None
    digest: str = ""
    path: str = ""
    repairable: bool = False
    repaired: bool = False

    def line(self) -> str:
        if self.repaired:
            return f"{self.message} [repaired]"
        if self.repairable:
            return f"{self.message} [repairable with --repair]"
        return self.message


@dataclass
class FsckReport:
    data_dir: str
    manager_running: bool
    repair: bool
    windows: int = 0
    chunk_rows: int = 0
    chunk_files: int = 0
    chunks_verified: int = 0
    in_flight_skipped: int = 0
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    """Oddities that do not make the store unclean (stray files nobody wrote there)."""
    unrecoverable_windows: dict[str, list[int]] = field(default_factory=dict)
    """'tenant/name' -> indices of its chunks that are missing or corrupt."""
    unrecoverable_keys: list[tuple[str, str]] = field(default_factory=list)
    """(tenant, key) of each key (KeyedChunkService) whose value is missing or corrupt."""

    @property
    def clean(self) -> bool:
        return not self.problems

    @property
    def repaired(self) -> int:
        return sum(1 for p in self.problems if p.repaired)

    @property
    def remaining(self) -> int:
        return sum(1 for p in self.problems if not p.repaired)

    def as_dict(self) -> dict[str, Any]:
        return {
            "data_dir": self.data_dir,
            "manager_running": self.manager_running,
            "repair": self.repair,
            "clean": self.clean,
            "windows": self.windows,
            "chunk_rows": self.chunk_rows,
            "chunk_files": self.chunk_files,
            "chunks_verified": self.chunks_verified,
            "in_flight_skipped": self.in_flight_skipped,
            "problem_count": len(self.problems),
            "repaired_count": self.repaired,
            "problems": [asdict(p) for p in self.problems],
            "warnings": [asdict(p) for p in self.warnings],
            "unrecoverable_windows": [
                {"window": key, "chunks": indices}
                for key, indices in sorted(self.unrecoverable_windows.items())
            ],
            "unrecoverable_keys": [
                {"tenant": tenant, "key": key} for tenant, key in sorted(self.unrecoverable_keys)
            ],
        }


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


@dataclass(frozen=True)
class _Reference:
    """One use of a chunk: by chunk `index` of `window`, or by `key` (then window is "")."""

    tenant: str
    window: str
    index: int
    raw_size: int
    key: str | None = None

    @property
    def label(self) -> str:
        return _user_label(self.tenant, self.window, self.key)

    @property
    def where(self) -> str:
        """The reference inside its user: "window 'w' chunk 3", or "key 'k'"."""
        if self.key is not None:
            return self.label
        return f"{self.label} chunk {self.index}"


def _short(digest: bytes) -> str:
    return digest.hex()[:12] + "…"


def _user_label(tenant: str, window: str, key: str | None = None) -> str:
    """How a message names a chunk's user: a window, or a key of KeyedChunkService."""
    what = f"key {key[:80]!r}" if key is not None else f"window {window!r}"
    return what if tenant == "default" else f"tenant {tenant!r} {what}"


def _check_file(
    disk: DiskTier, tenant: str, digest: bytes, raw_size: int, keyring: Keyring | None = None
) -> str | None:
    """Why the chunk's file is unusable ("missing", "corrupt (...)", or UNVERIFIABLE when
    it is sealed with a key fsck was not given), or None if it is sound."""
    try:
        stored = disk.read(tenant, digest)
    except ChunkFileMissing:
        return "missing"
    except ChunkFileCorrupt as exc:
        why = str(exc).rpartition(": ")[2]
        return f"corrupt ({why})"
    except OSError as exc:
        return f"corrupt (unreadable: {exc.strerror or exc})"
    if is_sealed(stored.codec):
        codec = plain_codec(stored.codec)
        try:
            if keyring is None:
                raise KeyUnavailable(tenant, parse_envelope(stored.data)[0])
            data = keyring.open(
                tenant, digest, codec, stored.word_size, stored.raw_size, stored.data
            )
        except KeyUnavailable as exc:
            return f"{UNVERIFIABLE}: encrypted with key {exc.key_id!r}, which fsck was not given"
        except SealBroken as exc:
            return f"corrupt ({exc})"
        stored = StoredChunk(codec, stored.word_size, stored.raw_size, data)
    try:
        raw = decode(stored.data, stored.codec, stored.raw_size, stored.word_size)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the bytes are bad
        return f"corrupt (does not decode: {exc})"
    if blake3_digest(raw) != digest:
        return "corrupt (digest mismatch)"
    if raw_size and len(raw) != raw_size:
        return f"corrupt ({len(raw)} bytes, the window says {raw_size})"
    return None


def _window_problems(window: pb.WindowInfo) -> list[str]:
    """Inconsistencies inside one window's own metadata."""
    found: list[str] = []
    if len(window.token_ids) != window.token_count:
        found.append(f"{len(window.token_ids)} token ids but token_count {window.token_count}")
    if len(window.chunks) != window.chunk_count:
        found.append(f"{len(window.chunks)} chunk refs but chunk_count {window.chunk_count}")
    if window.chunk_tokens == 0:
        found.append("chunk_tokens is 0")
        return found
    spans = token_spans(len(window.token_ids), window.chunk_tokens)
    if len(spans) != len(window.chunks):
        found.append(
            f"{len(window.token_ids)} tokens in chunks of {window.chunk_tokens} make "
            f"{len(spans)} chunks, the window lists {len(window.chunks)}"
        )
        return found
    sized = window.fingerprint.kv_dtype in DTYPE_SIZE
    for position, (ref, (start, count)) in enumerate(zip(window.chunks, spans, strict=True)):
        if ref.index != position or ref.token_start != start or ref.token_count != count:
            found.append(
                f"chunk ref {position} says chunk {ref.index} at tokens "
                f"[{ref.token_start}, +{ref.token_count}), expected [{start}, +{count})"
            )
        elif sized and ref.raw_size != chunk_raw_size(window.fingerprint, count):
            found.append(f"chunk {position} raw_size {ref.raw_size} does not fit the fingerprint")
    if window.raw_bytes != sum(ref.raw_size for ref in window.chunks):
        found.append(f"raw_bytes {window.raw_bytes} is not the sum of its chunks")
    return found


class _Checker:
    def __init__(
        self,
        data_dir: Path,
        repair: bool,
        running: bool,
        progress: Progress | None,
        keyring: Keyring | None = None,
    ) -> None:
        self.keyring = keyring
        self.data_dir = data_dir
        self.repair = repair
        self.running = running
        self.progress = progress
        self.catalog = Catalog(data_dir / CATALOG_FILE, read_only=not repair)
        self.disk = DiskTier(data_dir, fsync=True)
        self.store = ChunkStore(self.disk, MemoryTier(0), compress=False)
        self.report = FsckReport(str(data_dir), manager_running=running, repair=repair)
        self.now = time.time()

    def close(self) -> None:
        self.catalog.close()

    def _add(self, problem: Problem) -> None:
        self.report.problems.append(problem)

    def _young(self, path: Path) -> bool:
        """With a manager running, a recent file may belong to a freeze still in flight."""
        if not self.running:
            return False
        try:
            return self.now - path.stat().st_mtime < IN_FLIGHT_GRACE_SECONDS
        except FileNotFoundError:
            return True  # gone already: the manager was using it

    # -- the passes ---------------------------------------------------------------------

    def run(self) -> FsckReport:
        refs, rows = self._read_catalog()
        self._check_referenced(refs, rows)
        self._check_unreferenced_rows(refs, rows)
        self._check_files(refs, rows)
        return self.report

    def _read_catalog(
        self,
    ) -> tuple[dict[tuple[str, bytes], list[_Reference]], dict[tuple[str, bytes], ChunkRow]]:
        refs: dict[tuple[str, bytes], list[_Reference]] = defaultdict(list)
        rows: dict[tuple[str, bytes], ChunkRow] = {}
        with self.catalog.snapshot():
            for window in self.catalog.iter_all_windows():
                self.report.windows += 1
                for why in _window_problems(window):
                    self._add(
                        Problem(
                            BAD_WINDOW,
                            f"{_user_label(window.tenant, window.name)}: inconsistent "
                            f"metadata: {why}",
                            tenant=window.tenant,
                            window=window.name,
                        )
                    )
                for ref in window.chunks:
                    refs[(window.tenant, ref.digest)].append(
                        _Reference(window.tenant, window.name, ref.index, ref.raw_size)
                    )
            # Keys of KeyedChunkService hold references like windows do (catalog.KeyedCatalog).
            for tenant, key, digest, raw_size in KeyedCatalog(self.catalog).iter_refs():
                refs[(tenant, digest)].append(_Reference(tenant, "", 0, raw_size, key=key))
            for tenant, row in self.catalog.iter_chunks():
                rows[(tenant, row.digest)] = row
        self.report.chunk_rows = len(rows)
        return refs, rows

    def _still_there(self, reference: _Reference) -> bool:
        """With a manager running, a window may have been deleted since the snapshot."""
        if not self.running:
            return True
        if reference.key is not None:
            return KeyedCatalog(self.catalog).key_exists(reference.tenant, reference.key)
        return self.catalog.window_exists(reference.tenant, reference.window, include_expired=True)

    def _check_referenced(
        self,
        refs: dict[tuple[str, bytes], list[_Reference]],
        rows: dict[tuple[str, bytes], ChunkRow],
    ) -> None:
        total = len(refs)
        for done, ((tenant, digest), users) in enumerate(sorted(refs.items()), start=1):
            if self.progress is not None:
                self.progress(done, total)
            row = rows.get((tenant, digest))
            why = _check_file(self.disk, tenant, digest, users[0].raw_size, self.keyring)
            if why is not None and why.startswith(UNVERIFIABLE):
                self.report.warnings.append(
                    Problem(
                        UNVERIFIABLE,
                        f"chunk {_short(digest)} of tenant {tenant!r} is {why}; pass "
                        "`--key-file` to verify it (without its key it cannot be read: "
                        "crypto-shredded if the key was deleted)",
                        tenant=tenant,
                        digest=digest.hex(),
                        path=str(self.disk.path_for(tenant, digest)),
                    )
                )
                why = None
            else:
                self.report.chunks_verified += 1
            if why is not None:
                self._report_bad_chunk(tenant, digest, users, why, row is None)
            elif row is None:
                self._report_missing_row(tenant, digest, users)
            if row is not None and row.refcount != len(users):
                problem = Problem(
                    REFCOUNT,
                    f"chunk {_short(digest)}: refcount {row.refcount}, but windows hold "
                    f"{len(users)} references",
                    tenant=tenant,
                    digest=digest.hex(),
                    repairable=True,
                )
                if self.repair:
                    self.catalog.set_refcount(tenant, digest, len(users))
                    problem.repaired = True
                self._add(problem)

    def _report_bad_chunk(
        self,
        tenant: str,
        digest: bytes,
        users: list[_Reference],
        why: str,
        no_row: bool,
    ) -> None:
        for user in users:
            if not self._still_there(user):
                continue
            detail = f"{why}; it has no catalog row either" if no_row else why
            self._add(
                Problem(
                    MISSING_FILE if why == "missing" else CORRUPT,
                    f"{user.where} ({_short(digest)}): {detail}",
                    tenant=tenant,
                    window=user.window,
                    key=user.key or "",
                    chunk_index=None if user.key is not None else user.index,
                    digest=digest.hex(),
                    path=str(self.disk.path_for(tenant, digest)),
                )
            )
            if user.key is not None:
                self.report.unrecoverable_keys.append((tenant, user.key))
            else:
                name = f"{tenant}/{user.window}"
                self.report.unrecoverable_windows.setdefault(name, []).append(user.index)

    def _report_missing_row(self, tenant: str, digest: bytes, users: list[_Reference]) -> None:
        live = [u for u in users if self._still_there(u)]
        if not live:
            return
        where = ", ".join(u.where for u in live[:5])
        more = f" and {len(live) - 5} more" if len(live) > 5 else ""
        problem = Problem(
            MISSING_ROW,
            f"chunk {_short(digest)} (used by {where}{more}): its file is intact but it has "
            "no catalog row, so a restart would delete it",
            tenant=tenant,
            window=live[0].window,
            key=live[0].key or "",
            chunk_index=None if live[0].key is not None else live[0].index,
            digest=digest.hex(),
            repairable=True,
        )
        if self.repair:
            stored = self.disk.read(tenant, digest)
            self.catalog.insert_chunk_row(
                tenant,
                ChunkRow(
                    digest=digest,
                    refcount=len(users),
                    raw_size=stored.raw_size,
                    stored_size=HEADER_SIZE + len(stored.data),
                    codec=plain_codec(stored.codec),
                ),
            )
            problem.repaired = True
        self._add(problem)

    def _check_unreferenced_rows(
        self,
        refs: dict[tuple[str, bytes], list[_Reference]],
        rows: dict[tuple[str, bytes], ChunkRow],
    ) -> None:
        for (tenant, digest), row in sorted(rows.items()):
            if (tenant, digest) in refs:
                continue
            problem = Problem(
                UNREFERENCED_ROW,
                f"chunk {_short(digest)}: refcount {row.refcount} but no window uses it",
                tenant=tenant,
                digest=digest.hex(),
                path=str(self.disk.path_for(tenant, digest)),
                repairable=True,
            )
            if self.repair:
                self.catalog.set_refcount(tenant, digest, 0)
                self.store.remove(tenant, digest)
                problem.repaired = True
            self._add(problem)

    def _check_files(
        self,
        refs: dict[tuple[str, bytes], list[_Reference]],
        rows: dict[tuple[str, bytes], ChunkRow],
    ) -> None:
        root = self.disk.root
        if not root.exists():
            return
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            relative = path.relative_to(root)
            if path.name.endswith(TMP_SUFFIX):
                self._check_temp(path, relative)
                continue
            parts = relative.parts
            digest = _digest_of(path.name)
            if len(parts) != 3 or digest is None or self.disk.path_for(parts[0], digest) != path:
                self.report.warnings.append(
                    Problem(
                        STRAY_FILE,
                        f"unexpected file chunks/{relative} (not a chunk file; left alone)",
                        path=str(path),
                    )
                )
                continue
            tenant = parts[0]
            self.report.chunk_files += 1
            if (tenant, digest) in rows or (tenant, digest) in refs:
                continue  # accounted for (a missing row was reported above)
            if self._young(path) or (self.running and self.catalog.chunk(tenant, digest)):
                self.report.in_flight_skipped += 1
                continue
            problem = Problem(
                ORPHAN_FILE,
                f"orphan chunk file chunks/{relative}: no catalog row references it",
                tenant=tenant,
                digest=digest.hex(),
                path=str(path),
                repairable=True,
            )
            if self.repair:
                self.store.remove(tenant, digest)
                problem.repaired = True
            self._add(problem)

    def _check_temp(self, path: Path, relative: Path) -> None:
        if self._young(path):
            self.report.in_flight_skipped += 1
            return
        problem = Problem(
            TEMP_FILE,
            f"temp file chunks/{relative} left by an interrupted write",
            path=str(path),
            repairable=True,
        )
        if self.repair:
            path.unlink(missing_ok=True)
            problem.repaired = True
        self._add(problem)


def _digest_of(name: str) -> bytes | None:
    if len(name) != 64:
        return None
    try:
        return bytes.fromhex(name)
    except ValueError:
        return None


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
    checker = _Checker(root, repair=repair, running=running, progress=progress, keyring=keyring)
    try:
        return checker.run()
    finally:
        checker.close()


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
