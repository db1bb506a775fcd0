"""ChunkStore: the only way into the tiers. Whatever enters is verified against its digest
first; whatever leaves is verified (BLAKE3 for disk and Redis, the seal for memory) before
anyone sees it; sealing, compression and the metrics hooks happen here and nowhere else.

Freeze and keyed puts store through `put`; thaw, keyed gets and the catalog's Redis copy
read through `get`, `get_from_memory`, `get_as_stored` and `ensure_in_redis`; commits and
fsck check a disk copy with `verified_on_disk` and `check_disk_copy`; collection removes
through `remove*`. These calls block; the manager runs them on its I/O threads (except
`get_from_memory`, cheap enough for the event loop).
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from cwm_client.chunks import digest as blake3_digest
from cwm_client.codecs import RAW, decode, encode_if_smaller, pays
from cwm_client.errors import CwmError, DataLoss, ResourceExhausted, Unavailable
from cwm_server.manager.tiers.base import ChunkCorrupt
from cwm_server.manager.tiers.disk import DiskFile, DiskTier
from cwm_server.manager.tiers.format import StoredChunk
from cwm_server.manager.tiers.memory import MemoryTier
from cwm_server.manager.tiers.quarantine import Quarantine
from cwm_server.manager.tiers.redis import RedisTier
from cwm_server.manager.tiers.redis_link import tenant_from_tag
from cwm_server.manager.tiers.sealing import Keyring, open_chunk, plain_codec, seal_chunk

log = structlog.get_logger("cwm.store")


@dataclass(frozen=True)
class StoreResult:
    """How a chunk is stored: what its catalog row records."""

    codec: int
    """Its codec as stored, before sealing."""
    stored_size: int
    raw_size: int


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

    def corrupt(self, tier: str) -> None:
        """A copy in `tier` failed its check on a read (and was quarantined)."""


def digest_mismatch(subject: str, digest: bytes, field: str = "chunk.data") -> DataLoss:
    """The refusal of bytes that arrived for storing under a digest they do not match;
    `subject` names them for the sender ("chunk 3", "the value of key 'k'")."""
    return DataLoss(
        f"{subject}: its bytes do not match its BLAKE3 digest {digest.hex()[:16]}…; it was "
        "corrupted on the way or the digest was computed over other bytes",
        field=field,
        reason="DIGEST_MISMATCH",
    )


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
        self._disk = disk
        self._memory = memory
        self._redis = redis
        self._compress = compress
        self.observer = StoreObserver()
        self.disk_enabled = disk_enabled or redis is None
        self.redis_required = redis is not None and (redis_required or not self.disk_enabled)
        self.redis_skips = 0
        """Best-effort Redis copies skipped since start (Redis away, full or refusing)."""
        self.quarantine: Quarantine | None = None
        """Where disk copies found corrupt go, so the next copy of their bytes heals them
        (`tiers.quarantine`); None: they stay where they are (fsck's own store)."""
        self.keyring: Keyring | None = None
        """Per-tenant keys (`sealing`): chunks of tenants with an active key are sealed
        before they reach any tier below memory, and opened on the way out."""

    @property
    def has_redis(self) -> bool:
        return self._redis is not None

    # -- into the store ---------------------------------------------------------------------

    def reserve_memory(self, size: int) -> int:
        """Count a received chunk's `size` bytes against the hot tier's cap until it is
        stored (`release_memory` with what this returns): a transfer's staging and the hot
        tier together stay within the cap, not the cap plus every transfer's chunks."""
        return self._memory.reserve(size)

    def release_memory(self, reserved: int) -> None:
        self._memory.release(reserved)

    def put(
        self,
        tenant: str,
        digest: bytes,
        raw: bytes,
        word_size: int,
        subject: str,
        *,
        field: str = "chunk.data",
        received: tuple[int, bytes | memoryview] | None = None,
    ) -> StoreResult:
        """Verify raw bytes against their digest (DATA_LOSS DIGEST_MISMATCH naming `subject`
        and `field` if they differ, and nothing is stored), then store them durably and in
        memory. `received`: (codec, bytes) as the sender encoded them; with compression on,
        bytes compressed enough to pay are stored as they came (no CPU spent compressing
        them again), any others are compressed here when that pays."""
        observer = self.observer
        started = time.perf_counter()
        matches = blake3_digest(raw) == digest
        verified = time.perf_counter()
        observer.verified("store", verified - started)
        if not matches:
            raise digest_mismatch(subject, digest, field)
        seal = self._memory.seal_for(raw)  # now: the bytes the BLAKE3 check just passed
        codec: int
        encoded: bytes | memoryview
        if not self._compress:
            codec, encoded = RAW, raw
        elif received is not None and received[0] != RAW and pays(len(received[1]), len(raw)):
            codec, encoded = received
        else:
            codec, encoded = encode_if_smaller(raw, word_size)
        chunk = StoredChunk(codec, word_size, len(raw), encoded)
        stored = self._write_durably(tenant, digest, chunk, subject)
        if self.quarantine is not None:
            self.quarantine.healed(tenant, digest)
        observer.stored(time.perf_counter() - verified)
        self._memory.write(tenant, digest, raw, seal)
        return StoreResult(codec=codec, stored_size=stored, raw_size=len(raw))

    def _write_durably(self, tenant: str, digest: bytes, chunk: StoredChunk, subject: str) -> int:
        """Write one encoded chunk, sealed if its tenant encrypts, to the durable tiers the
        policy names: the disk (unless it is off) and Redis (write-through; required, or
        best effort, see __init__). Returns the bytes it occupies in the durable tier."""
        stored = 0
        chunk = seal_chunk(self.keyring, tenant, digest, chunk)
        if self.disk_enabled:
            try:
                stored = self._disk.write(tenant, digest, chunk)
            except OSError as exc:
                raise _write_error(subject, exc) from None
        if self._redis is not None:
            try:
                in_redis = self._redis.write(tenant, digest, chunk)
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

    # -- out of the store -------------------------------------------------------------------

    def get(self, tenant: str, digest: bytes, where: str) -> bytes:
        """Raw bytes of a chunk, verified, from memory, else disk, else Redis (a hit below
        memory enters memory); DATA_LOSS naming `where` if they cannot be had."""
        cached = self.get_from_memory(tenant, digest)
        if cached is not None:
            return cached
        observer = self.observer
        observer.miss("memory")
        started = time.perf_counter()
        raw = None
        if self.disk_enabled:
            try:
                found = self._disk.read(tenant, digest)
                if found is not None:
                    raw = self._decoded(tenant, digest, found)
            except ValueError as exc:  # ChunkCorrupt, or bytes that do not decode
                return self._heal(tenant, digest, where, f"corrupt on disk ({exc})")
            if raw is None:
                observer.miss("disk")
        if raw is None:
            if self._redis is not None:
                return self._get_redis(tenant, digest, where)
            raise DataLoss(
                f"{where}: chunk file {digest.hex()} is missing from the store; "
                "run `cwm fsck` to see what else is affected",
                reason="CHUNK_MISSING",
            )
        if not self._verify_load(digest, raw):
            return self._heal(
                tenant, digest, where, "corrupt on disk (its bytes do not match the digest)"
            )
        self._loaded(tenant, digest, raw, "disk", started)
        return raw

    def _heal(self, tenant: str, digest: bytes, where: str, why: str) -> bytes:
        """A disk copy failed its check: quarantine it, then serve (and rewrite on disk) a
        verified copy from Redis if there is one; else DATA_LOSS saying how to repair it."""
        if self.quarantine is not None:
            self.quarantine.move(self._disk.path_for(tenant, digest), tenant, digest, why)
        self.observer.corrupt("disk")
        if self._redis is not None:
            found = self._redis.read(tenant, digest)
            if found is not None:
                try:
                    raw = self._decoded(tenant, digest, found)
                except ValueError:
                    raw = b""
                if raw and self._verify_load(digest, raw):
                    with contextlib.suppress(OSError):
                        self._disk.write(tenant, digest, found)  # the local copy, repaired
                        if self.quarantine is not None:
                            self.quarantine.healed(tenant, digest)
                    self._loaded(tenant, digest, raw, "redis", time.perf_counter())
                    return raw
        healing = (
            "; it was quarantined, and the next freeze or `cwm import` of the same bytes "
            "repairs every window that uses it (FindMissingChunks lists it as missing now)"
            if self.quarantine is not None
            else ""
        )
        raise DataLoss(
            f"{where}: chunk {digest.hex()} is {why}; refusing to serve it{healing}; "
            "run `cwm fsck` to see what else is affected",
            reason="CHUNK_CORRUPT",
        )

    def get_from_memory(self, tenant: str, digest: bytes) -> bytes | None:
        """The chunk's raw bytes if the memory tier holds them unchanged (its seal checked,
        see memory), else None; no miss is counted. Cheap enough for the event loop, which
        a thaw uses to send memory hits without a round trip to an I/O thread."""
        started = time.perf_counter()
        cached = self._memory.read(tenant, digest)
        if cached is None:
            return None
        done = time.perf_counter()
        self.observer.verified("load", done - started)
        self.observer.hit("memory", done - started)
        return cached

    def get_as_stored(
        self, tenant: str, digest: bytes, accept: Container[int]
    ) -> StoredChunk | None:
        """The disk's copy of a chunk, opened but still encoded, if its codec is one of
        `accept` and it decodes to bytes matching the digest (which then enter memory);
        None to take `get` instead, which reports whatever is wrong. A thaw whose client
        takes the stored codec sends these bytes as they are, without encoding them again."""
        if not self.disk_enabled:
            return None
        started = time.perf_counter()
        try:
            found = self._disk.read(tenant, digest)
            if found is None:
                return None
            stored = open_chunk(self.keyring, tenant, digest, found)
            if stored.codec not in accept:
                return None
            raw = decode(stored.data, stored.codec, stored.raw_size, stored.word_size)
        except ValueError:
            return None
        if not self._verify_load(digest, raw):
            return None
        self._loaded(tenant, digest, raw, "disk", started)
        return stored

    def _get_redis(self, tenant: str, digest: bytes, where: str) -> bytes:
        """Read memory and disk missed: Redis, verified, promoted to the memory tier."""
        assert self._redis is not None
        started = time.perf_counter()
        try:
            found = self._redis.read(tenant, digest)
            if found is None:
                self.observer.miss("redis")
                raise DataLoss(
                    f"{where}: chunk {digest.hex()} is in neither this manager's tiers nor "
                    "Redis; run `cwm fsck` to see what else is affected",
                    reason="CHUNK_MISSING",
                )
            raw = self._decoded(tenant, digest, found)
        except ValueError as exc:
            raise DataLoss(
                f"{where}: chunk {digest.hex()} is corrupt in Redis ({exc})",
                reason="CHUNK_CORRUPT",
            ) from None
        if not self._verify_load(digest, raw):
            raise DataLoss(
                f"{where}: chunk {digest.hex()} failed verification (the bytes in Redis do "
                "not match the digest); refusing to serve it",
                reason="CHUNK_CORRUPT",
            )
        self._loaded(tenant, digest, raw, "redis", started)
        return raw

    def _decoded(self, tenant: str, digest: bytes, found: StoredChunk) -> bytes:
        """The raw bytes of a chunk as a tier below memory holds it (ValueError if they
        cannot be had: a broken seal, or bytes that do not decode)."""
        stored = open_chunk(self.keyring, tenant, digest, found)
        return decode(stored.data, stored.codec, stored.raw_size, stored.word_size)

    def _verify_load(self, digest: bytes, raw: bytes) -> bool:
        """Whether `raw`, read from a tier below memory, matches its digest (timed)."""
        checked = time.perf_counter()
        matches: bool = blake3_digest(raw) == digest
        self.observer.verified("load", time.perf_counter() - checked)
        return matches

    def _loaded(self, tenant: str, digest: bytes, raw: bytes, tier: str, started: float) -> None:
        """A verified read from `tier`: counted, and kept in memory for the next one."""
        self.observer.hit(tier, time.perf_counter() - started)
        self._memory.write(tenant, digest, raw)

    # -- checks of the disk's copy ------------------------------------------------------------

    def check_disk_copy(self, tenant: str, digest: bytes) -> StoredChunk | None:
        """The disk's copy of a chunk exactly as it rests (sealed if it is), once one read
        has shown that it opens, decodes and matches its digest; None if there is no file.
        ChunkCorrupt says why a copy is unsound (`why`: its header, its seal, "does not
        decode: ...", "digest mismatch"); FAILED_PRECONDITION if it is sealed with a key
        this store lacks; an unreadable file raises the OSError."""
        found = self._disk.read(tenant, digest)
        if found is None:
            return None
        stored = open_chunk(self.keyring, tenant, digest, found)
        try:
            raw = decode(stored.data, stored.codec, stored.raw_size, stored.word_size)
        except ValueError as exc:
            raise ChunkCorrupt(f"does not decode: {exc}") from None
        if blake3_digest(raw) != digest:
            raise ChunkCorrupt("digest mismatch")
        return found

    def verified_on_disk(self, tenant: str, digest: bytes) -> StoreResult | None:
        """How the disk holds a chunk, if it holds a sound copy (see `check_disk_copy`);
        None if it holds none. A commit counts on such a chunk when no row lists it."""
        found = self._sound_disk_copy(tenant, digest)
        if found is None:
            return None
        return StoreResult(plain_codec(found.codec), found.stored_size, found.raw_size)

    def described_on_disk(self, tenant: str, digest: bytes) -> StoreResult | None:
        """How the disk's file of a chunk says the chunk is stored (its header and size;
        nothing verified, even a sealed file whose key is missing answers); None if there
        is no file. fsck rebuilds a lost catalog row from it."""
        found = self._disk.read(tenant, digest)
        if found is None:
            return None
        return StoreResult(plain_codec(found.codec), found.stored_size, found.raw_size)

    def _sound_disk_copy(self, tenant: str, digest: bytes) -> StoredChunk | None:
        try:
            return self.check_disk_copy(tenant, digest)
        except ValueError:
            return None

    def chunk_path(self, tenant: str, digest: bytes) -> Path:
        """Where the disk keeps (or would keep) a chunk's file, for messages."""
        return self._disk.path_for(tenant, digest)

    def disk_files(self) -> Iterator[DiskFile]:
        """Every file under the disk tier's root, told apart (see `DiskTier.files`)."""
        return self._disk.files()

    # -- removal ----------------------------------------------------------------------------

    def remove(self, tenant: str, digest: bytes) -> None:
        """Drop a chunk from every tier."""
        self.remove_local(tenant, digest)
        if self._redis is not None:
            self._redis.remove(tenant, [digest])

    def remove_local(self, tenant: str, digest: bytes) -> None:
        """Drop a chunk from this manager's own tiers (memory, disk), not from Redis."""
        self._memory.remove(tenant, [digest])
        if self.disk_enabled:
            self._disk.remove(tenant, [digest])

    def remove_from_redis(self, tenant: str, digests: Sequence[bytes]) -> None:
        """Drop chunks' Redis copies (nothing without a Redis tier); UNAVAILABLE if Redis
        cannot be reached."""
        if self._redis is not None:
            self._redis.remove(tenant, digests)

    # -- the shared tier (Redis) --------------------------------------------------------------

    def ensure_in_redis(self, tenant: str, digests: list[bytes]) -> set[bytes]:
        """Which of `digests` Redis holds, after copying there the ones it lacks that this
        manager's memory or disk holds (verified). UNAVAILABLE if Redis cannot be reached."""
        redis = self._redis
        if redis is None:
            return set(digests)
        present = redis.contains(tenant, digests)
        for digest in digests:
            if digest in present:
                continue
            raw = self._memory.read(tenant, digest)
            if raw is not None:
                chunk = StoredChunk(RAW, 1, len(raw), raw)
                redis.write(tenant, digest, seal_chunk(self.keyring, tenant, digest, chunk))
                present.add(digest)
                continue
            found = self._sound_disk_copy(tenant, digest) if self.disk_enabled else None
            if found is not None:
                redis.write(tenant, digest, found)  # as it rests: sealed if it is
                present.add(digest)
        return present

    def chunks_in_redis(self) -> Iterator[tuple[str, bytes]]:
        """(tenant, digest) of every chunk Redis holds under this manager's prefix (a SCAN
        of every master: slow on a big keyspace); nothing without a Redis tier."""
        if self._redis is None:
            return
        for tag, digest in self._redis.scan():
            tenant = tenant_from_tag(tag)
            if tenant is not None:
                yield tenant, digest


def _write_error(subject: str, exc: OSError) -> CwmError:
    """A disk that cannot take the chunk is the server's condition, not the client's
    mistake: full → RESOURCE_EXHAUSTED, anything else → UNAVAILABLE (retry elsewhere/later).
    Nothing is committed either way; the freeze's clean-up removes what was written."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(
            f"{subject}: the manager's disk is full ({exc.strerror}); free space or "
            "delete windows, then retry",
            reason="DISK_FULL",
        )
    return Unavailable(
        f"{subject}: the manager cannot write to its data dir ({exc.strerror}); `cwm "
        "status` shows the disk tier's health",
        reason="DISK_UNWRITABLE",
    )
