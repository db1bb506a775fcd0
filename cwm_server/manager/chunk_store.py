"""The tiers behind one interface: put verifies and stores durably, get reads memory then
disk and verifies whatever it returns. These calls block; the manager runs them on its I/O
threads."""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass

from cwm_client.chunks import digest as blake3_digest
from cwm_client.codecs import RAW, decode, encode_if_smaller
from cwm_client.errors import CwmError, DataLoss, ResourceExhausted, Unavailable
from cwm_server.manager.disk_tier import ChunkFileCorrupt, ChunkFileMissing, DiskTier
from cwm_server.manager.memory_tier import MemoryTier


@dataclass(frozen=True)
class StoreResult:
    codec: int
    stored_size: int


class StoreObserver:
    """Hooks the store calls as it works; this one does nothing. The manager's metrics
    (cwm_server.manager.metrics) plug in their own. Called from I/O threads."""

    def verified(self, op: str, seconds: float) -> None:
        """A BLAKE3 check took `seconds`; `op` is "store" or "load"."""

    def stored(self, seconds: float) -> None:
        """A chunk was compressed (maybe) and written durably in `seconds`."""

    def hit(self, tier: str, seconds: float) -> None:
        """A chunk was read from `tier` ("memory" or "disk") in `seconds`."""

    def miss(self, tier: str) -> None:
        """`tier` did not hold a chunk that was asked for."""


class ChunkStore:
    def __init__(self, disk: DiskTier, memory: MemoryTier, compress: bool) -> None:
        self.disk = disk
        self.memory = memory
        self._compress = compress
        self.observer = StoreObserver()

    def put(
        self, tenant: str, digest: bytes, raw: bytes, word_size: int, index: int
    ) -> StoreResult:
        """Verify raw bytes against their digest, then store them durably and in memory."""
        observer = self.observer
        started = time.perf_counter()
        matches = blake3_digest(raw) == digest
        verified = time.perf_counter()
        observer.verified("store", verified - started)
        if not matches:
            raise DataLoss(
                f"chunk {index}: its bytes do not match its BLAKE3 digest {digest.hex()[:16]}…; "
                "it was corrupted on the way or the digest was computed over other bytes",
                field="chunk.data",
                reason="DIGEST_MISMATCH",
            )
        codec, encoded = encode_if_smaller(raw, word_size) if self._compress else (RAW, raw)
        try:
            stored = self.disk.write(tenant, digest, codec, word_size, len(raw), encoded)
        except OSError as exc:
            raise _write_error(index, exc) from None
        observer.stored(time.perf_counter() - verified)
        self.memory.put((tenant, digest), raw)
        return StoreResult(codec=codec, stored_size=stored)

    def get(self, tenant: str, digest: bytes, where: str) -> bytes:
        """Raw bytes of a chunk, verified; DATA_LOSS naming `where` if they cannot be had."""
        observer = self.observer
        started = time.perf_counter()
        cached = self.memory.get((tenant, digest))
        if cached is not None:
            checked = time.perf_counter()
            matches = blake3_digest(cached) == digest
            done = time.perf_counter()
            observer.verified("load", done - checked)
            if matches:
                observer.hit("memory", done - started)
                return cached
        observer.miss("memory")
        started = time.perf_counter()
        try:
            raw = self._read_disk(tenant, digest)
        except ChunkFileMissing:
            observer.miss("disk")
            raise DataLoss(
                f"{where}: chunk file {digest.hex()} is missing from the store; "
                "run `cwm fsck` to see what else is affected",
                reason="CHUNK_MISSING",
            ) from None
        except (ChunkFileCorrupt, ValueError) as exc:
            raise DataLoss(
                f"{where}: chunk {digest.hex()} is corrupt on disk ({exc}); "
                "run `cwm fsck` to see what else is affected",
                reason="CHUNK_CORRUPT",
            ) from None
        checked = time.perf_counter()
        matches = blake3_digest(raw) == digest
        done = time.perf_counter()
        observer.verified("load", done - checked)
        if not matches:
            raise DataLoss(
                f"{where}: chunk {digest.hex()} failed verification (stored bytes do not "
                "match the digest); refusing to serve it; run `cwm fsck`",
                reason="CHUNK_CORRUPT",
            )
        observer.hit("disk", done - started)
        self.memory.put((tenant, digest), raw)
        return raw

    def _read_disk(self, tenant: str, digest: bytes) -> bytes:
        stored = self.disk.read(tenant, digest)
        return decode(stored.data, stored.codec, stored.raw_size, stored.word_size)

    def verify_on_disk(self, tenant: str, digest: bytes) -> bool:
        """True if the disk holds the chunk and it decodes to bytes matching the digest."""
        try:
            raw = self._read_disk(tenant, digest)
        except (ChunkFileMissing, ChunkFileCorrupt, ValueError):
            return False
        return blake3_digest(raw) == digest

    def remove(self, tenant: str, digest: bytes) -> None:
        self.memory.discard((tenant, digest))
        self.disk.remove(tenant, digest)


def _write_error(index: int, exc: OSError) -> CwmError:
    """A disk that cannot take the chunk is the server's condition, not the client's
    mistake: full → RESOURCE_EXHAUSTED, anything else → UNAVAILABLE (retry elsewhere/later).
    Nothing is committed either way; the freeze's clean-up removes what was written."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(
            f"chunk {index}: the manager's disk is full ({exc.strerror}); free space or "
            "delete windows, then retry",
            reason="DISK_FULL",
        )
    return Unavailable(
        f"chunk {index}: the manager cannot write to its data dir ({exc.strerror}); `cwm "
        "status` shows the disk tier's health",
        reason="DISK_UNWRITABLE",
    )
