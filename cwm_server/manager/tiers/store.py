"""The tiers behind one interface: put verifies and stores durably, get reads memory then
disk and verifies whatever it returns. These calls block; the manager runs them on its I/O
threads."""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass

import structlog

from cwm_client.chunks import digest as blake3_digest
from cwm_client.codecs import RAW, decode, encode_if_smaller
from cwm_client.errors import (
    CwmError,
    DataLoss,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
)
from cwm_server.manager.tiers.disk import ChunkFileCorrupt, ChunkFileMissing, DiskTier, StoredChunk
from cwm_server.manager.tiers.memory import MemoryTier
from cwm_server.manager.tiers.redis import RedisTier
from cwm_server.manager.tiers.sealing import (
    SEALED,
    Keyring,
    KeyUnavailable,
    is_sealed,
    parse_envelope,
    plain_codec,
)

log = structlog.get_logger("cwm.store")


@dataclass(frozen=True)
class StoreResult:
    codec: int
    stored_size: int


class StoreObserver:
    """Hooks the store calls as it works; this one does nothing. The manager's metrics
    (cwm_server.manager.metrics) plug in their own. Called from I/O threads and (memory
    hits of a thaw) from the event loop."""

    def verified(self, op: str, seconds: float) -> None:
        """A check took `seconds`: BLAKE3, or the seal of a memory hit; `op` is "store" or
        "load"."""

    def stored(self, seconds: float) -> None:
        """A chunk was compressed (maybe) and written durably in `seconds`."""

    def hit(self, tier: str, seconds: float) -> None:
        """A chunk was read from `tier` ("memory" or "disk") in `seconds`."""

    def miss(self, tier: str) -> None:
        """`tier` did not hold a chunk that was asked for."""

    def redis_skipped(self, reason: str) -> None:
        """A best-effort Redis copy was skipped (Redis away or refusing: `reason`)."""


class ChunkStore:
    def __init__(
        self,
        disk: DiskTier,
        memory: MemoryTier,
        compress: bool,
        redis: RedisTier | None = None,
        *,
        disk_enabled: bool = True,
        redis_required: bool = False,
    ) -> None:
        """`redis`: the shared tier (None: none). `disk_enabled` False makes Redis the
        durable tier (policy redis-only: no chunk files). `redis_required`: a chunk write
        that cannot reach Redis fails (shared catalog, or no disk); otherwise Redis is a
        best-effort copy and the manager goes on from its disk while Redis is away."""
        self.disk = disk
        self.memory = memory
        self._compress = compress
        self.observer = StoreObserver()
        self.redis = redis
        self.disk_enabled = disk_enabled or redis is None
        self.redis_required = redis is not None and (redis_required or not self.disk_enabled)
        self.redis_skips = 0
        """Best-effort Redis copies skipped since start (Redis away, full or refusing)."""
        self.keyring: Keyring | None = None
        """Per-tenant keys (encryption.py): chunks of tenants with an active key are sealed
        before they reach any tier, and sealed chunks are opened on the way out."""

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
        seal = self.memory.seal_for(raw)  # now: the bytes the BLAKE3 check just passed
        codec, encoded = encode_if_smaller(raw, word_size) if self._compress else (RAW, raw)
        stored = self.write_encoded(tenant, digest, codec, word_size, len(raw), encoded, index)
        observer.stored(time.perf_counter() - verified)
        self.memory.put((tenant, digest), raw, seal)
        return StoreResult(codec=codec, stored_size=stored)

    def get(self, tenant: str, digest: bytes, where: str) -> bytes:
        """Raw bytes of a chunk, verified; DATA_LOSS naming `where` if they cannot be had."""
        cached = self.get_from_memory(tenant, digest)
        if cached is not None:
            return cached
        observer = self.observer
        observer.miss("memory")
        started = time.perf_counter()
        try:
            if not self.disk_enabled:
                raise ChunkFileMissing(digest.hex())
            raw = self._read_disk(tenant, digest)
        except ChunkFileMissing:
            if self.disk_enabled:
                observer.miss("disk")
            if self.redis is not None:
                return self._get_redis(tenant, digest, where)
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
        return self._verified_hit(
            tenant, digest, raw, "disk", started, f"{where}: chunk {digest.hex()} failed "
            "verification (stored bytes do not match the digest); refusing to serve it; run "
            "`cwm fsck`",
        )  # fmt: skip

    def get_from_memory(self, tenant: str, digest: bytes) -> bytes | None:
        """The chunk's raw bytes if the memory tier holds them unchanged (its seal checked,
        see memory_tier), else None; no miss is counted. Cheap enough for the event loop,
        which a thaw uses to send memory hits without a round trip to an I/O thread."""
        started = time.perf_counter()
        cached = self.memory.get((tenant, digest))
        if cached is None:
            return None
        done = time.perf_counter()
        self.observer.verified("load", done - started)
        self.observer.hit("memory", done - started)
        return cached

    def _verified_hit(
        self, tenant: str, digest: bytes, raw: bytes, tier: str, started: float, refusal: str
    ) -> bytes:
        """`raw` read from `tier` if it matches its digest (then also kept in memory);
        DATA_LOSS with `refusal` if not. Every tier below memory ends its read here."""
        observer = self.observer
        checked = time.perf_counter()
        matches = blake3_digest(raw) == digest
        done = time.perf_counter()
        observer.verified("load", done - checked)
        if not matches:
            raise DataLoss(refusal, reason="CHUNK_CORRUPT")
        observer.hit(tier, done - started)
        self.memory.put((tenant, digest), raw)
        return raw

    def _read_disk(self, tenant: str, digest: bytes) -> bytes:
        stored = self.read_stored(tenant, digest)
        return decode(stored.data, stored.codec, stored.raw_size, stored.word_size)

    # -- encryption at rest (cwm_server.manager.tiers.sealing) --------------------------------

    def seal(
        self,
        tenant: str,
        digest: bytes,
        codec: int,
        word_size: int,
        raw_size: int,
        encoded: bytes | memoryview,
    ) -> tuple[int, bytes | memoryview]:
        """(codec, bytes) as a tier must store them: sealed (codec | SEALED) if the tenant
        has an active key, else unchanged."""
        keyring = self.keyring
        if keyring is None or not keyring.encrypts(tenant):
            return codec, encoded
        sealed = keyring.seal(tenant, digest, codec, word_size, raw_size, bytes(encoded))
        return codec | SEALED, sealed

    def open_stored(self, tenant: str, digest: bytes, stored: StoredChunk) -> StoredChunk:
        """`stored` with its bytes unsealed if a tier held them sealed. A key this manager
        lacks is FAILED_PRECONDITION (ENCRYPTION_KEY_UNAVAILABLE); an envelope that does
        not authenticate raises SealBroken (a ValueError: the callers' "corrupt")."""
        if not is_sealed(stored.codec):
            return stored
        codec = plain_codec(stored.codec)
        try:
            if self.keyring is None:
                raise KeyUnavailable(tenant, _key_id_of(stored.data))
            data = self.keyring.open(
                tenant, digest, codec, stored.word_size, stored.raw_size, stored.data
            )
        except KeyUnavailable as exc:
            raise FailedPrecondition(
                f"chunk {digest.hex()[:16]}…: {exc}; restore the key to the manager's "
                "--key-file and restart it, or delete the window if its data was shredded",
                reason="ENCRYPTION_KEY_UNAVAILABLE",
                metadata={"tenant": tenant, "key_id": exc.key_id},
            ) from None
        return StoredChunk(codec, stored.word_size, stored.raw_size, data)

    def read_stored(self, tenant: str, digest: bytes) -> StoredChunk:
        """The disk's copy of a chunk, unsealed: encoded bytes and their codec."""
        return self.open_stored(tenant, digest, self.disk.read(tenant, digest))

    def verify_on_disk(self, tenant: str, digest: bytes) -> bool:
        """True if the disk holds the chunk and it decodes to bytes matching the digest."""
        try:
            raw = self._read_disk(tenant, digest)
        except (ChunkFileMissing, ChunkFileCorrupt, ValueError):
            return False
        return blake3_digest(raw) == digest

    def remove(self, tenant: str, digest: bytes) -> None:
        self.remove_local(tenant, digest)
        if self.redis is not None:
            self.redis.remove_many(tenant, [digest])

    def remove_local(self, tenant: str, digest: bytes) -> None:
        """Drop a chunk from this manager's own tiers (memory, disk), not from Redis."""
        self.memory.discard((tenant, digest))
        if self.disk_enabled:
            self.disk.remove(tenant, digest)

    # -- the Redis tier (cwm_server.manager.tiers.redis) ---------------------------------

    def write_encoded(
        self,
        tenant: str,
        digest: bytes,
        codec: int,
        word_size: int,
        raw_size: int,
        encoded: bytes | memoryview,
        index: int,
    ) -> int:
        """Write one encoded chunk to the durable tiers the policy names: the disk (unless
        it is off) and Redis (write-through; required, or best effort, see __init__)."""
        stored = 0
        codec, encoded = self.seal(tenant, digest, codec, word_size, raw_size, encoded)
        if self.disk_enabled:
            try:
                stored = self.disk.write(tenant, digest, codec, word_size, raw_size, encoded)
            except OSError as exc:
                raise _write_error(index, exc) from None
        if self.redis is not None:
            try:
                in_redis = self.redis.put(tenant, digest, codec, word_size, raw_size, encoded)
            except CwmError as exc:  # away (UNAVAILABLE) or refusing (REDIS_FULL, ...)
                if self.redis_required:
                    raise
                # Best effort: the disk holds the chunk; the freeze goes on without a copy.
                self.redis_skips += 1
                self.observer.redis_skipped(exc.reason)
                log.warning(
                    "redis_copy_skipped",
                    tenant=tenant,
                    digest=digest.hex()[:16],
                    reason=exc.reason,
                )
            else:
                if not self.disk_enabled:
                    stored = in_redis
        return stored

    def _get_redis(self, tenant: str, digest: bytes, where: str) -> bytes:
        """Read memory and disk missed: Redis, verified, promoted to the memory tier."""
        assert self.redis is not None
        observer = self.observer
        started = time.perf_counter()
        try:
            stored = self.redis.get(tenant, digest)
            if stored is None:
                observer.miss("redis")
                raise DataLoss(
                    f"{where}: chunk {digest.hex()} is in neither this manager's tiers nor "
                    "Redis; run `cwm fsck` to see what else is affected",
                    reason="CHUNK_MISSING",
                )
            stored = self.open_stored(tenant, digest, stored)
            raw = decode(stored.data, stored.codec, stored.raw_size, stored.word_size)
        except ValueError as exc:
            raise DataLoss(
                f"{where}: chunk {digest.hex()} is corrupt in Redis ({exc})",
                reason="CHUNK_CORRUPT",
            ) from None
        return self._verified_hit(
            tenant, digest, raw, "redis", started, f"{where}: chunk {digest.hex()} failed "
            "verification (the bytes in Redis do not match the digest); refusing to serve it",
        )  # fmt: skip

    def ensure_in_redis(self, tenant: str, digests: list[bytes]) -> set[bytes]:
        """Which of `digests` Redis holds, after copying there the ones it lacks that this
        manager's memory or disk holds (verified). UNAVAILABLE if Redis cannot be reached."""
        if self.redis is None:
            return set(digests)
        present = self.redis.present(tenant, digests)
        for digest in digests:
            if digest in present:
                continue
            raw = self.memory.get((tenant, digest))
            if raw is not None:
                codec, data = self.seal(tenant, digest, RAW, 1, len(raw), raw)
                self.redis.put(tenant, digest, codec, 1, len(raw), data)
                present.add(digest)
                continue
            if self.disk_enabled and self.verify_on_disk(tenant, digest):
                stored = self.disk.read(tenant, digest)
                self.redis.put(
                    tenant, digest, stored.codec, stored.word_size, stored.raw_size, stored.data
                )
                present.add(digest)
        return present


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


def _key_id_of(envelope: bytes | memoryview) -> str:
    try:
        return parse_envelope(envelope)[0]
    except ValueError:
        return "?"
