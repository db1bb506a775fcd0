"""KeyedChunks: the domain object behind KeyedChunkService (a KV engine's remote tier).

A value stored under a key is an ordinary cwm chunk: content-addressed by its BLAKE3
digest, verified before it is stored and on every read, compressed and kept in the same
tiers as window chunks, and deduplicated against them. The key row (catalog.KeyedCatalog)
holds one reference on the chunk, as each use by a window does, so a chunk that a key and a
promoted window share lives until both are gone.

A put stream holds at most one value in memory (the manager's max_chunk_bytes bounds it)
and stores it before it reads the next part; its key rows commit in one transaction when
the stream ends, so a stream that fails stores nothing visible (its files are collected).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from cwm_client import pb
from cwm_client.chunks import DIGEST_SIZE, chunk_raw_size
from cwm_client.chunks import digest as blake3_digest
from cwm_client.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from cwm_server.manager import paging
from cwm_server.manager.catalog.sqlite import (
    KeyedCatalog,
    KeyRow,
    NewChunk,
    NewKey,
    WindowExists,
    basic_view,
)
from cwm_server.manager.quotas import Reservation, declared_chunks, reserve_on_catalog_thread
from cwm_server.manager.tiers.disk import HEADER_SIZE
from cwm_server.manager.tiers.sealing import plain_codec
from cwm_server.manager.tiers.store import StoreResult
from cwm_server.manager.windows.checks import expiry_from_ttl
from cwm_server.manager.windows.freeze import CANCEL_SETTLE_S, _window_info, validate_header
from cwm_server.manager.windows.manager import WindowManager, window_exists_error

log = structlog.get_logger("cwm.keyed")

MAX_KEY_BYTES = 1024
MAX_METADATA_BYTES = 64 << 10
MAX_PART_BYTES = 4 << 20
MIN_PART_BYTES = 64 << 10
"""GetKeyedChunks sends parts of at least this many bytes (as Thaw does), whatever
max_part_bytes asks: a tiny value must not turn one value into millions of messages."""
MAX_KEYS_PER_GET = 1024
MAX_KEYS_PER_LOOKUP = 100_000
WORD_SIZES = (0, 1, 2, 4)


def check_key(key: str, field: str = "key") -> str:
    size = len(key.encode())
    if size == 0 or size > MAX_KEY_BYTES:
        raise InvalidArgument(
            f"{field} is {size} bytes; keys must be 1 to {MAX_KEY_BYTES} bytes",
            field=field,
            reason="BAD_KEY",
        )
    return key


def check_keys(keys: Sequence[str], limit: int, field: str = "keys") -> list[str]:
    if len(keys) > limit:
        raise InvalidArgument(
            f"at most {limit} keys per call, got {len(keys)}", field=field, reason="TOO_MANY_KEYS"
        )
    for position, key in enumerate(keys):
        check_key(key, f"{field}[{position}]")
    return list(keys)


def key_not_found(key: str, field: str) -> NotFound:
    return NotFound(
        f"no key {key[:80]!r}; ListKeys lists what exists",
        field=field,
        reason="KEY_NOT_FOUND",
        metadata={"key": key[:256]},
    )


@dataclass
class _Value:
    """The value a put stream is receiving."""

    key: str
    digest: bytes
    raw_size: int
    metadata: bytes
    word_size: int
    buffer: bytearray
    filled: int = 0


class KeyedChunks:
    def __init__(self, manager: WindowManager) -> None:
        self._manager = manager
        self._catalog = manager.keyed_catalog

    @property
    def catalog(self) -> KeyedCatalog:
        """The key rows; only the embedded SQLite catalog has them so far."""
        if self._catalog is None:
            raise FailedPrecondition(
                "this manager keeps its catalog in Redis (shared mode); KeyedChunkService "
                "needs the embedded SQLite catalog for now: run the LMCache tier against a "
                "manager without --redis-catalog",
                reason="KEYED_NEEDS_SQLITE_CATALOG",
            )
        return self._catalog

    # -- put ------------------------------------------------------------------------------

    async def put(
        self, tenant: str, requests: AsyncIterator[pb.PutKeyedChunksRequest]
    ) -> pb.PutKeyedChunksResponse:
        manager = self._manager
        if self._catalog is None:
            _ = self.catalog  # raises FAILED_PRECONDITION before a byte is received
        entries: dict[str, NewKey] = {}
        new_chunks: dict[bytes, NewChunk] = {}
        written: set[bytes] = set()
        writes: list[concurrent.futures.Future[StoreResult]] = []
        reservations: list[Reservation] = []
        pins: list[tuple[str, bytes]] = []
        reused = 0
        received = 0
        current: _Value | None = None
        try:
            async for request in requests:
                part = request.part
                if current is None:
                    current = self._start_value(part)
                    pins += manager.pin(tenant, [current.digest])
                    if current.digest not in new_chunks:
                        reservations += await self._reserve_value(tenant, current)
                else:
                    self._check_continuation(current, part)
                data = part.data
                end = current.filled + len(data)
                if end > current.raw_size:
                    raise InvalidArgument(
                        f"value of key {current.key[:80]!r}: parts exceed raw_size "
                        f"{current.raw_size}",
                        field="part.data",
                    )
                current.buffer[current.filled : end] = data
                current.filled = end
                if current.filled < current.raw_size:
                    continue
                value, current = current, None
                received += value.raw_size
                stored = await self._store_value(tenant, value, new_chunks, written, writes)
                reused += 0 if stored else 1
                entries.pop(value.key, None)
                entries[value.key] = NewKey(
                    value.key, value.digest, value.raw_size, bytes(value.metadata)
                )
                del value
            if current is not None:
                raise InvalidArgument(
                    f"the stream ended in the middle of the value of key {current.key[:80]!r} "
                    f"({current.filled} of {current.raw_size} bytes)",
                    field="part.data",
                )
            await asyncio.sleep(CANCEL_SETTLE_S)
            freed = await manager.db(self._commit_put, tenant, list(entries.values()), new_chunks)
        except BaseException:
            manager.unpin(pins)
            pins = []
            if written:
                await _shielded(self._discard(tenant, writes, written))
            raise
        finally:
            manager.unpin(pins)
            for reservation in reservations:
                reservation.release()
        await manager.collect(tenant, freed)
        log.info("keys_stored", tenant=tenant, keys=len(entries), reused=reused)
        return pb.PutKeyedChunksResponse(
            keys_stored=len(entries), chunks_reused=reused, bytes_received=received
        )

    async def _reserve_value(self, tenant: str, value: _Value) -> list[Reservation]:
        """Reserve the value's chunk against the tenant's max_bytes quota, unless the
        tenant stores it already: RESOURCE_EXHAUSTED (QUOTA_EXCEEDED) before a byte of it
        is stored. Keyed values add bytes, never windows. The same ledger as freezes, so
        puts and freezes in flight cannot jointly overshoot."""
        manager = self._manager
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

    async def _discard(
        self,
        tenant: str,
        writes: list[concurrent.futures.Future[StoreResult]],
        written: set[bytes],
    ) -> None:
        """After a failed or cancelled put: wait for the stores still running on the I/O
        threads (they cannot be cancelled), then collect the files no row references;
        collecting first would let a file land afterwards and stay until a restart."""
        try:
            if writes:
                await asyncio.to_thread(concurrent.futures.wait, writes)
            await self._manager.collect(tenant, written)
        except Exception:  # noqa: BLE001 - start-up recovery collects whatever is left
            log.warning("keyed_discard_failed", tenant=tenant, chunks=len(written))

    def _start_value(self, part: pb.KeyedChunkPart) -> _Value:
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
        limit = self._manager.config.max_chunk_bytes
        if part.raw_size == 0 or part.raw_size > limit:
            raise InvalidArgument(
                f"value of key {part.key[:80]!r}: raw_size {part.raw_size} must be 1 to {limit} "
                "bytes (the manager's max_chunk_bytes)",
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
        return _Value(
            key=part.key,
            digest=part.digest,
            raw_size=part.raw_size,
            metadata=part.metadata,
            word_size=part.word_size or 1,
            buffer=bytearray(part.raw_size),
        )

    @staticmethod
    def _check_continuation(current: _Value, part: pb.KeyedChunkPart) -> None:
        if part.key != current.key:
            raise InvalidArgument(
                f"a part of key {part.key[:80]!r} arrived before the value of key "
                f"{current.key[:80]!r} was complete: values must not interleave",
                field="part.key",
            )
        if part.data_offset != current.filled:
            raise InvalidArgument(
                f"value of key {current.key[:80]!r}: part at offset {part.data_offset}, "
                f"expected {current.filled}",
                field="part.data_offset",
            )
        if (part.digest and part.digest != current.digest) or (
            part.raw_size and part.raw_size != current.raw_size
        ):
            raise InvalidArgument(
                f"value of key {current.key[:80]!r}: a later part changes its digest or size",
                field="part.digest",
            )

    async def _store_value(
        self,
        tenant: str,
        value: _Value,
        new_chunks: dict[bytes, NewChunk],
        written: set[bytes],
        writes: list[concurrent.futures.Future[StoreResult]],
    ) -> bool:
        """Verify the value and store its chunk unless the store holds it; True if stored.
        The store runs on an I/O thread; its future goes to `writes`, so a failed stream
        can wait for it before collecting."""
        manager = self._manager
        held = value.digest in new_chunks or (
            await manager.db(manager.catalog.chunk, tenant, value.digest) is not None
        )
        raw = bytes(value.buffer)
        if held:
            if await manager.io(blake3_digest, raw) != value.digest:
                raise _digest_mismatch(value.key, value.digest)
            return False
        written.add(value.digest)
        work = manager.submit_io(manager.store.put, tenant, value.digest, raw, value.word_size, 0)
        writes.append(work)
        try:
            result = await asyncio.wrap_future(work)
        except DataLoss:
            raise _digest_mismatch(value.key, value.digest) from None
        new_chunks[value.digest] = NewChunk(
            value.digest, value.raw_size, result.stored_size, result.codec
        )
        return True

    def _commit_put(
        self, tenant: str, entries: list[NewKey], new_chunks: dict[bytes, NewChunk]
    ) -> list[bytes]:
        manager = self._manager
        known = dict(new_chunks)
        for entry in entries:
            if entry.digest in known or manager.catalog.chunk(tenant, entry.digest) is not None:
                continue
            # The chunk was held when its value arrived, and its last user went since; the
            # pin kept the file, so it still serves if it verifies.
            if not manager.store.verify_on_disk(tenant, entry.digest):
                raise FailedPrecondition(
                    f"the chunk of key {entry.key[:80]!r} was deleted while the stream ran; "
                    "send the value again",
                    field="part.digest",
                    reason="CHUNK_NOT_SENT",
                )
            stored = manager.disk.read(tenant, entry.digest)
            known[entry.digest] = NewChunk(
                entry.digest,
                stored.raw_size,
                HEADER_SIZE + len(stored.data),
                plain_codec(stored.codec),
            )
        return self.catalog.put_keys(tenant, entries, known, time.time())

    # -- get --------------------------------------------------------------------------------

    async def get(
        self, tenant: str, request: pb.GetKeyedChunksRequest
    ) -> AsyncIterator[pb.GetKeyedChunksResponse]:
        keys = check_keys(request.keys, MAX_KEYS_PER_GET)
        manager = self._manager
        part_bytes = request.max_part_bytes or manager.config.part_bytes
        part_bytes = max(MIN_PART_BYTES, min(part_bytes, MAX_PART_BYTES))
        rows: dict[str, KeyRow] = await manager.db(self.catalog.get_keys, tenant, keys)
        pins = manager.pin(tenant, [row.digest for row in rows.values()])
        try:
            for key in keys:
                row = rows.get(key)
                if row is None:
                    yield pb.GetKeyedChunksResponse(part=pb.KeyedChunkPart(key=key), found=False)
                    continue
                raw = await manager.io(manager.store.get, tenant, row.digest, f"key {key[:80]!r}")
                view = memoryview(raw)
                for offset in range(0, len(raw), part_bytes):
                    part = pb.KeyedChunkPart(
                        key=key, data_offset=offset, data=bytes(view[offset : offset + part_bytes])
                    )
                    if offset == 0:
                        part.digest = row.digest
                        part.raw_size = row.raw_size
                        part.metadata = row.metadata
                    yield pb.GetKeyedChunksResponse(part=part, found=True)
                del raw, view
        finally:
            manager.unpin(pins)

    # -- lookups ------------------------------------------------------------------------------

    async def contains_prefix(self, tenant: str, keys: Sequence[str]) -> int:
        checked = check_keys(keys, MAX_KEYS_PER_LOOKUP)
        count: int = await self._manager.db(self.catalog.contains_prefix, tenant, checked)
        return count

    async def list(
        self, tenant: str, request: pb.ListKeysRequest
    ) -> tuple[list[pb.KeyedChunkInfo], str]:
        page_size = paging.page_size(request.page_size)
        after = paging.decode_page_token(request.page_token, check_key)
        rows: list[KeyRow] = await self._manager.db(
            lambda: self.catalog.list_keys(
                tenant, after=after, key_prefix=request.key_prefix, limit=page_size + 1
            )
        )
        infos = [_info(row) for row in rows[:page_size]]
        token = paging.encode_page_token(rows[page_size - 1].key) if len(rows) > page_size else ""
        return infos, token

    async def delete(self, tenant: str, keys: Sequence[str]) -> pb.DeleteKeysResponse:
        checked = check_keys(keys, MAX_KEYS_PER_LOOKUP)
        deleted, freed = await self._manager.db(self.catalog.delete_keys, tenant, checked)
        await self._manager.collect(tenant, [d for d, _ in freed])
        log.info("keys_deleted", tenant=tenant, keys=deleted, chunks_freed=len(freed))
        return pb.DeleteKeysResponse(
            keys_deleted=deleted,
            chunks_freed=len(freed),
            bytes_freed=sum(size for _, size in freed),
        )

    # -- promote ------------------------------------------------------------------------------

    async def promote(self, tenant: str, request: pb.PromoteKeysToWindowRequest) -> pb.WindowInfo:
        keys = check_keys(request.keys, MAX_KEYS_PER_LOOKUP)
        if request.chunk_tokens and request.token_ids:
            expected = -(-len(request.token_ids) // request.chunk_tokens)
            if len(keys) != expected:
                raise InvalidArgument(
                    f"{len(request.token_ids)} tokens in chunks of {request.chunk_tokens} make "
                    f"{expected} chunks, but keys lists {len(keys)}",
                    field="keys",
                )
        header = pb.FreezeHeader(
            name=request.name,
            session_id=request.session_id,
            cache_salt=request.cache_salt,
            fingerprint=request.fingerprint if request.HasField("fingerprint") else None,
            token_ids=request.token_ids,
            chunk_tokens=request.chunk_tokens,
            chunk_digests=[bytes(DIGEST_SIZE)] * len(keys),
            tags=dict(request.tags),
            description=request.description,
            ttl_seconds=request.ttl_seconds,
            replace=request.replace,
        )
        manager = self._manager
        spans = validate_header(header, manager.config.max_chunk_bytes)
        expires = expiry_from_ttl(request.ttl_seconds)

        def _promote() -> tuple[pb.WindowInfo, list[bytes]]:
            rows = self.catalog.get_keys(tenant, keys)
            known: dict[bytes, NewChunk] = {}
            for index, (key, (_, count)) in enumerate(zip(keys, spans, strict=True)):
                row = rows.get(key)
                if row is None:
                    raise key_not_found(key, f"keys[{index}]")
                expected = chunk_raw_size(header.fingerprint, count)
                if row.raw_size != expected:
                    raise InvalidArgument(
                        f"keys[{index}] holds {row.raw_size} bytes, but {count} tokens of this "
                        f"fingerprint are {expected} bytes in the canonical layout "
                        "[2, layers, tokens, heads*dim]",
                        field=f"keys[{index}]",
                        reason="KEY_SIZE_MISMATCH",
                    )
                chunk = manager.catalog.chunk(tenant, row.digest)
                assert chunk is not None  # the key row holds a reference
                known[row.digest] = NewChunk(
                    row.digest, chunk.raw_size, chunk.stored_size, chunk.codec
                )
                header.chunk_digests[index] = row.digest
            window = _window_info(tenant, header, spans, known, expires)
            # Its chunks are the keys', already counted: only max_windows can refuse it.
            manager.check_window_quota(tenant, header.name)
            try:
                freed = manager.catalog.commit_window(window, known, header.replace)
            except WindowExists:
                raise window_exists_error(header.name) from None
            return window, freed

        window, freed = await manager.after_collecting_expired(tenant, lambda: manager.db(_promote))
        await manager.collect(tenant, freed)
        log.info("keys_promoted", tenant=tenant, window=window.name, chunks=window.chunk_count)
        return basic_view(window)


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


def _digest_mismatch(key: str, digest: bytes) -> DataLoss:
    return DataLoss(
        f"the value of key {key[:80]!r} does not match its BLAKE3 digest "
        f"{digest.hex()[:16]}…; it was corrupted on the way or the digest was computed over "
        "other bytes; nothing of this stream was stored",
        field="part.data",
        reason="DIGEST_MISMATCH",
    )


def _info(row: KeyRow) -> pb.KeyedChunkInfo:
    info = pb.KeyedChunkInfo(
        key=row.key,
        digest=row.digest,
        raw_size=row.raw_size,
        stored_size=row.stored_size,
        metadata_size=len(row.metadata),
    )
    info.created_at.FromNanoseconds(int(row.created_at * 1e9))
    return info
