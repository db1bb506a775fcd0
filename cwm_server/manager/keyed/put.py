"""One PutKeyedChunks stream: receive values part by part, store each as a verified chunk,
and commit the stream's key rows in one transaction when it ends.

A put stream holds at most one value in memory (the manager's max_chunk_bytes bounds it)
and stores it before it reads the next part; a stream that fails stores nothing visible
(its files are collected).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from cwm_client import pb
from cwm_client.chunks import DIGEST_SIZE
from cwm_client.chunks import digest as blake3_digest
from cwm_client.errors import FailedPrecondition, InvalidArgument
from cwm_server.manager.catalog.base import NewChunk
from cwm_server.manager.catalog.keyed import KeyedCatalog, NewKey
from cwm_server.manager.keyed.checks import MAX_METADATA_BYTES, WORD_SIZES, check_key
from cwm_server.manager.quotas import Reservation, declared_chunks, reserve_on_catalog_thread
from cwm_server.manager.tiers.store import StoreResult, digest_mismatch
from cwm_server.manager.windows.freeze import CANCEL_SETTLE_S
from cwm_server.manager.windows.manager import WindowManager

log = structlog.get_logger("cwm.keyed")


@dataclass
class IncomingValue:
    """The value a put stream is receiving, filled part by part."""

    key: str
    digest: bytes
    raw_size: int
    metadata: bytes
    word_size: int
    buffer: bytearray
    filled: int = 0

    @classmethod
    def start(cls, part: pb.KeyedChunkPart, max_chunk_bytes: int) -> IncomingValue:
        """The value whose first part is `part`; INVALID_ARGUMENT if that part cannot
        start one (its key, offset, digest, size, metadata or word size)."""
        check_key(part.key, "part.key")
        if part.data_offset != 0:
            raise InvalidArgument(
                f"value of key {part.key[:80]!r}: its first part starts at offset "
                f"{part.data_offset}, expected 0",
                field="part.data_offset",
            )
        if len(part.digest) != DIGEST_SIZE:
            raise InvalidArgument(
                f"value of key {part.key[:80]!r}: digest is {len(part.digest)} bytes; BLAKE3 "
                f"digests are {DIGEST_SIZE}",
                field="part.digest",
            )
        if part.raw_size == 0 or part.raw_size > max_chunk_bytes:
            raise InvalidArgument(
                f"value of key {part.key[:80]!r}: raw_size {part.raw_size} must be 1 to "
                f"{max_chunk_bytes} bytes (the manager's max_chunk_bytes)",
                field="part.raw_size",
            )
        if len(part.metadata) > MAX_METADATA_BYTES:
            raise InvalidArgument(
                f"value of key {part.key[:80]!r}: metadata is {len(part.metadata)} bytes; the "
                f"limit is {MAX_METADATA_BYTES}",
                field="part.metadata",
            )
        if part.word_size not in WORD_SIZES:
            raise InvalidArgument(
                f"value of key {part.key[:80]!r}: word_size {part.word_size} must be 0, 1, 2 or 4",
                field="part.word_size",
            )
        return cls(
            key=part.key,
            digest=part.digest,
            raw_size=part.raw_size,
            metadata=part.metadata,
            word_size=part.word_size or 1,
            buffer=bytearray(part.raw_size),
        )

    def check_next(self, part: pb.KeyedChunkPart) -> None:
        """INVALID_ARGUMENT unless `part` continues this value where it stands."""
        if part.key != self.key:
            raise InvalidArgument(
                f"a part of key {part.key[:80]!r} arrived before the value of key "
                f"{self.key[:80]!r} was complete: values must not interleave",
                field="part.key",
            )
        if part.data_offset != self.filled:
            raise InvalidArgument(
                f"value of key {self.key[:80]!r}: part at offset {part.data_offset}, "
                f"expected {self.filled}",
                field="part.data_offset",
            )
        if (part.digest and part.digest != self.digest) or (
            part.raw_size and part.raw_size != self.raw_size
        ):
            raise InvalidArgument(
                f"value of key {self.key[:80]!r}: a later part changes its digest or size",
                field="part.digest",
            )

    def add(self, data: bytes) -> bool:
        """Append a part's bytes; True once the value is complete. INVALID_ARGUMENT if they
        run past its raw_size."""
        end = self.filled + len(data)
        if end > self.raw_size:
            raise InvalidArgument(
                f"value of key {self.key[:80]!r}: parts exceed raw_size {self.raw_size}",
                field="part.data",
            )
        self.buffer[self.filled : end] = data
        self.filled = end
        return end == self.raw_size

    @property
    def subject(self) -> str:
        """How messages name this value."""
        return f"the value of key {self.key[:80]!r}"


class KeyedPut:
    """One PutKeyedChunks call; `run` it once."""

    def __init__(self, manager: WindowManager, keys: KeyedCatalog, tenant: str) -> None:
        self._manager = manager
        self._keys = keys
        self._tenant = tenant
        self._entries: dict[str, NewKey] = {}
        self._new_chunks: dict[bytes, NewChunk] = {}
        """Chunks this stream stored, by digest."""
        self._written: set[bytes] = set()
        """Digests whose store began: their files may exist even if the stream fails."""
        self._writes: list[concurrent.futures.Future[StoreResult]] = []
        self._reused = 0
        self._received = 0

    async def run(
        self, requests: AsyncIterator[pb.PutKeyedChunksRequest]
    ) -> pb.PutKeyedChunksResponse:
        manager = self._manager
        tenant = self._tenant
        reservations: list[Reservation] = []
        pins: list[tuple[str, bytes]] = []
        current: IncomingValue | None = None
        try:
            async for request in requests:
                part = request.part
                if current is None:
                    current = IncomingValue.start(part, manager.config.max_chunk_bytes)
                    pins += manager.pin(tenant, [current.digest])
                    if current.digest not in self._new_chunks:
                        reservations += await self._reserve_value(current)
                else:
                    current.check_next(part)
                if not current.add(part.data):
                    continue
                value, current = current, None
                await self._take(value)
                del value
            if current is not None:
                raise InvalidArgument(
                    f"the stream ended in the middle of the value of key {current.key[:80]!r} "
                    f"({current.filled} of {current.raw_size} bytes)",
                    field="part.data",
                )
            await asyncio.sleep(CANCEL_SETTLE_S)
            entries = list(self._entries.values())
            freed = await manager.db(self._commit, entries)
        except BaseException:
            manager.unpin(pins)
            pins = []
            if self._written:
                await _shielded(self._discard())
            raise
        finally:
            manager.unpin(pins)
            for reservation in reservations:
                reservation.release()
        await manager.collect(tenant, freed)
        log.info("keys_stored", tenant=tenant, keys=len(entries), reused=self._reused)
        return pb.PutKeyedChunksResponse(
            keys_stored=len(entries), chunks_reused=self._reused, bytes_received=self._received
        )

    async def _take(self, value: IncomingValue) -> None:
        """A complete value: store its chunk (unless held) and note its key row; a key sent
        twice keeps its last value."""
        self._received += value.raw_size
        stored = await self._store_value(value)
        self._reused += 0 if stored else 1
        self._entries.pop(value.key, None)
        self._entries[value.key] = NewKey(
            value.key, value.digest, value.raw_size, bytes(value.metadata)
        )

    async def _reserve_value(self, value: IncomingValue) -> list[Reservation]:
        """Reserve the value's chunk against the tenant's max_bytes quota, unless the
        tenant stores it already: RESOURCE_EXHAUSTED (QUOTA_EXCEEDED) before a byte of it
        is stored. Keyed values add bytes, never windows. The same ledger as freezes, so
        puts and freezes in flight cannot jointly overshoot."""
        manager = self._manager
        tenant = self._tenant
        if not manager.quotas.limits_bytes(tenant):
            return []
        catalog = manager.catalog
        key = f"keyed:{next(_RESERVATION_IDS):x}"

        def _reserve() -> Reservation:
            return manager.quotas.reserve(
                tenant,
                key,
                usage=lambda: catalog.tenant_usage(tenant),
                new_chunks=lambda: declared_chunks(
                    [value.digest], [value.raw_size], lambda ds: catalog.has_chunk_rows(tenant, ds)
                ),
                new_windows=0,
            )

        return [
            await manager.after_collecting_expired(
                tenant, lambda: reserve_on_catalog_thread(manager.db, _reserve)
            )
        ]

    async def _store_value(self, value: IncomingValue) -> bool:
        """Verify the value and store its chunk unless the store holds it; True if stored.
        The store runs on an I/O thread; its future is kept, so a failed stream can wait
        for it before collecting."""
        manager = self._manager
        tenant = self._tenant
        digest = value.digest
        held = digest in self._new_chunks or (
            await manager.db(manager.catalog.chunk, tenant, digest) is not None
        )
        raw = bytes(value.buffer)
        if held:
            if await manager.io(blake3_digest, raw) != digest:
                raise digest_mismatch(value.subject, digest, "part.data")
            return False
        self._written.add(digest)
        subject = value.subject
        store = manager.store
        work = manager.submit_io(
            lambda: store.put(tenant, digest, raw, value.word_size, subject, field="part.data")
        )
        self._writes.append(work)
        result = await asyncio.wrap_future(work)
        self._new_chunks[digest] = NewChunk(
            digest, result.raw_size, result.stored_size, result.codec
        )
        return True

    def _commit(self, entries: list[NewKey]) -> list[bytes]:
        """On the catalog thread: the key rows, in one transaction; returns the digests
        the keys they replace no longer hold."""
        manager = self._manager
        tenant = self._tenant
        known = dict(self._new_chunks)
        for entry in entries:
            if entry.digest in known or manager.catalog.chunk(tenant, entry.digest) is not None:
                continue
            # The chunk was held when its value arrived, and its last user went since; the
            # pin kept the file, so it still serves if it verifies.
            on_disk = manager.store.verified_on_disk(tenant, entry.digest)
            if on_disk is None:
                raise FailedPrecondition(
                    f"the chunk of key {entry.key[:80]!r} was deleted while the stream ran; "
                    "send the value again",
                    field="part.digest",
                    reason="CHUNK_NOT_SENT",
                )
            known[entry.digest] = NewChunk(
                entry.digest, on_disk.raw_size, on_disk.stored_size, on_disk.codec
            )
        return self._keys.put_keys(tenant, entries, known, time.time())

    async def _discard(self) -> None:
        """After a failed or cancelled put: wait for the stores still running on the I/O
        threads (they cannot be cancelled), then collect the files no row references;
        collecting first would let a file land afterwards and stay until a restart."""
        try:
            if self._writes:
                await asyncio.to_thread(concurrent.futures.wait, self._writes)
            await self._manager.collect(self._tenant, self._written)
        except Exception:  # noqa: BLE001 - start-up recovery collects whatever is left
            log.warning("keyed_discard_failed", tenant=self._tenant, chunks=len(self._written))


_RESERVATION_IDS = itertools.count(1)
"""Distinct ledger keys for the values of keyed puts (each value reserves on its own)."""


async def _shielded(work: Coroutine[Any, Any, None]) -> None:
    """Run `work` to its end even if the caller is cancelled (again) meanwhile."""
    task = asyncio.ensure_future(work)
    _CLEANUPS.add(task)
    task.add_done_callback(_CLEANUPS.discard)
    await asyncio.shield(task)


_CLEANUPS: set[asyncio.Future[None]] = set()
"""Clean-ups running after a cancel: held here so they are not garbage-collected."""
