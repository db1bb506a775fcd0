"""Chunk files found corrupt, moved aside so that the next copy of the same bytes heals them.

A disk copy that fails its check (it does not open, decode or match its digest) is moved
out of the chunk tree to `<data_dir>/quarantine/<tenant>/<digest hex>` (kept for a person
to look at) and remembered, with the catalog row left as it is: every window that shares
the chunk still names it. `FindMissingChunks` then lists it as missing, so the next freeze
or `cwm import` of the same bytes sends it; the store writes a fresh, verified copy and the
quarantine lets it go. The set survives restarts (it is the quarantine directory), and
`cwm fsck --repair` moves corrupt files here too.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable
from pathlib import Path

import structlog

log = structlog.get_logger("cwm.quarantine")

DIRECTORY = "quarantine"


class Quarantine:
    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / DIRECTORY
        self._lock = threading.Lock()
        self._held: set[tuple[str, bytes]] = set(self._on_disk())
        self.moved = 0
        """Files moved here since start (a metric)."""

    def _on_disk(self) -> Iterable[tuple[str, bytes]]:
        if not self.root.is_dir():
            return
        for tenant_dir in self.root.iterdir():
            if not tenant_dir.is_dir():
                continue
            for path in tenant_dir.iterdir():
                with contextlib.suppress(ValueError):
                    digest = bytes.fromhex(path.name)
                    if len(digest) == 32:
                        yield tenant_dir.name, digest

    def path_for(self, tenant: str, digest: bytes) -> Path:
        return self.root / tenant / digest.hex()

    def move(self, chunk_file: Path, tenant: str, digest: bytes, why: str) -> bool:
        """Move `chunk_file` (the corrupt copy of `digest`) aside and remember it; False if
        it was gone already (another reader moved it). A file that cannot be moved is left
        where it is, and the chunk is remembered all the same."""
        target = self.path_for(tenant, digest)
        moved = False
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(chunk_file, target)
            moved = True
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error(
                "quarantine_move_failed", digest=digest.hex(), path=str(chunk_file), error=str(exc)
            )
        with self._lock:
            self._held.add((tenant, digest))
            if moved:
                self.moved += 1
        if moved:
            log.warning(
                "chunk_quarantined",
                tenant=tenant,
                digest=digest.hex(),
                why=why,
                moved_to=str(target),
            )
        return moved

    def missing(self, tenant: str, digests: Iterable[bytes]) -> set[bytes]:
        """Which of `digests` are quarantined for `tenant` (a store must be sent them)."""
        with self._lock:
            if not self._held:
                return set()
            return {d for d in digests if (tenant, d) in self._held}

    def healed(self, tenant: str, digest: bytes) -> None:
        """A verified copy of the chunk was written again: forget it, and drop its file."""
        with self._lock:
            if (tenant, digest) not in self._held:
                return
            self._held.discard((tenant, digest))
        self.path_for(tenant, digest).unlink(missing_ok=True)
        log.info("chunk_healed", tenant=tenant, digest=digest.hex())

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)
