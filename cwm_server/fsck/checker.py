"""The passes of one fsck run: every chunk a window or key references is checked through
the chunk store (`ChunkStore.check_disk_copy`: header, seal, decode, digest), refcounts are
compared with the references, and every file under ``chunks/`` is accounted for."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cwm_client.errors import FailedPrecondition
from cwm_server.fsck.metadata import window_problems
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
from cwm_server.manager.catalog.base import ChunkRow
from cwm_server.manager.catalog.keyed import KeyedCatalog
from cwm_server.manager.catalog.sqlite import SqliteCatalog
from cwm_server.manager.tiers.base import ChunkCorrupt
from cwm_server.manager.tiers.disk import DiskTier
from cwm_server.manager.tiers.memory import MemoryTier
from cwm_server.manager.tiers.quarantine import Quarantine
from cwm_server.manager.tiers.sealing import KEY_UNAVAILABLE, Keyring
from cwm_server.manager.tiers.store import ChunkStore

CATALOG_FILE = "catalog.sqlite"
IN_FLIGHT_GRACE_SECONDS = 300.0
"""With a manager running, chunk and temp files younger than this may belong to a freeze
that has not committed yet; they are counted as in flight, not reported."""

Progress = Callable[[int, int], None]
"""Told (done, total) as the referenced chunks are checked."""


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


def chunk_fault(store: ChunkStore, tenant: str, digest: bytes, raw_size: int) -> str | None:
    """Why the disk's copy of a chunk is unusable ("missing", "corrupt (...)", or
    UNVERIFIABLE when it is sealed with a key fsck was not given), or None if it is sound
    (and `raw_size` long, unless that is 0)."""
    try:
        found = store.check_disk_copy(tenant, digest)
    except ChunkCorrupt as exc:
        return f"corrupt ({exc.why})"
    except FailedPrecondition as exc:
        if exc.reason != KEY_UNAVAILABLE:
            raise
        key_id = exc.metadata.get("key_id", "?")
        return f"{UNVERIFIABLE}: encrypted with key {key_id!r}, which fsck was not given"
    except OSError as exc:
        return f"corrupt (unreadable: {exc.strerror or exc})"
    if found is None:
        return "missing"
    if raw_size and found.raw_size != raw_size:
        return f"corrupt ({found.raw_size} bytes, the window says {raw_size})"
    return None


class Checker:
    """One run of fsck over a data dir: `run` it once, then `close`."""

    def __init__(
        self,
        data_dir: Path,
        repair: bool,
        running: bool,
        progress: Progress | None,
        keyring: Keyring | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.repair = repair
        self.running = running
        self.progress = progress
        self.catalog = SqliteCatalog(data_dir / CATALOG_FILE, read_only=not repair)
        self.store = ChunkStore(DiskTier(data_dir, fsync=True), MemoryTier(0), compress=False)
        self.quarantine = Quarantine(data_dir)
        self.store.keyring = keyring
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
                for why in window_problems(window):
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
            why = chunk_fault(self.store, tenant, digest, users[0].raw_size)
            moved = why == "missing" and bool(self.quarantine.missing(tenant, [digest]))
            if moved:
                why = (
                    f"corrupt (found so on a read and quarantined at "
                    f"{self.quarantine.path_for(tenant, digest)}; the next freeze or `cwm "
                    "import` of the same bytes repairs it)"
                )
            if why is not None and why.startswith(UNVERIFIABLE):
                self.report.warnings.append(
                    Problem(
                        UNVERIFIABLE,
                        f"chunk {_short(digest)} of tenant {tenant!r} is {why}; pass "
                        "`--key-file` to verify it (without its key it cannot be read: "
                        "crypto-shredded if the key was deleted)",
                        tenant=tenant,
                        digest=digest.hex(),
                        path=str(self.store.chunk_path(tenant, digest)),
                    )
                )
                why = None
            else:
                self.report.chunks_verified += 1
            if why is not None:
                self._report_bad_chunk(tenant, digest, users, why, row is None, moved)
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
        moved: bool = False,
    ) -> None:
        corrupt = why != "missing"
        quarantined = moved or (corrupt and not no_row and self._quarantine(tenant, digest, why))
        for user in users:
            if not self._still_there(user):
                continue
            detail = f"{why}; it has no catalog row either" if no_row else why
            if corrupt and not no_row and not moved:
                detail += (
                    "; quarantined: the next freeze or `cwm import` of the same bytes repairs it"
                    if quarantined
                    else "; `--repair` (with the manager stopped) quarantines it, and the next "
                    "freeze or `cwm import` of the same bytes then repairs it"
                )
            self._add(
                Problem(
                    MISSING_FILE if why == "missing" else CORRUPT,
                    f"{user.where} ({_short(digest)}): {detail}",
                    tenant=tenant,
                    window=user.window,
                    key=user.key or "",
                    chunk_index=None if user.key is not None else user.index,
                    digest=digest.hex(),
                    path=str(self.store.chunk_path(tenant, digest)),
                    # Quarantined is contained, not repaired: the window still lacks the
                    # chunk until its bytes come again.
                    repairable=corrupt and not no_row and not quarantined,
                )
            )
            if user.key is not None:
                self.report.unrecoverable_keys.append((tenant, user.key))
            else:
                name = f"{tenant}/{user.window}"
                self.report.unrecoverable_windows.setdefault(name, []).append(user.index)

    def _quarantine(self, tenant: str, digest: bytes, why: str) -> bool:
        """With --repair and no manager running, move a corrupt chunk file into the
        quarantine (`tiers.quarantine`), which the manager reads at start-up."""
        if not self.repair or self.running:
            return False
        path = self.store.chunk_path(tenant, digest)
        return self.quarantine.move(Path(path), tenant, digest, why)

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
        stored = self.store.described_on_disk(tenant, digest) if self.repair else None
        if stored is not None:
            self.catalog.insert_chunk_row(
                tenant,
                ChunkRow(
                    digest=digest,
                    refcount=len(users),
                    raw_size=stored.raw_size,
                    stored_size=stored.stored_size,
                    codec=stored.codec,
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
                path=str(self.store.chunk_path(tenant, digest)),
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
        for file in self.store.disk_files():
            if file.temp:
                self._check_temp(file.path, file.relative)
                continue
            digest = file.digest
            if digest is None:
                self.report.warnings.append(
                    Problem(
                        STRAY_FILE,
                        f"unexpected file chunks/{file.relative} (not a chunk file; left alone)",
                        path=str(file.path),
                    )
                )
                continue
            tenant = file.tenant
            self.report.chunk_files += 1
            if (tenant, digest) in rows or (tenant, digest) in refs:
                continue  # accounted for (a missing row was reported above)
            if self._young(file.path) or (self.running and self.catalog.chunk(tenant, digest)):
                self.report.in_flight_skipped += 1
                continue
            problem = Problem(
                ORPHAN_FILE,
                f"orphan chunk file chunks/{file.relative}: no catalog row references it",
                tenant=tenant,
                digest=digest.hex(),
                path=str(file.path),
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
