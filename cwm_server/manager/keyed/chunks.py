"""KeyedChunks: the domain object behind KeyedChunkService (a KV engine's remote tier).

A value stored under a key is an ordinary cwm chunk: content-addressed by its BLAKE3
digest, verified before it is stored and on every read, compressed and kept in the same
tiers as window chunks, and deduplicated against them. The key row (catalog.keyed) holds
one reference on the chunk, as each use by a window does, so a chunk that a key and a
promoted window share lives until both are gone. Puts are streams of their own (`put`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

import structlog

from cwm_client import pb
from cwm_client.chunks import DIGEST_SIZE, chunk_raw_size
from cwm_client.errors import FailedPrecondition, InvalidArgument
from cwm_server.manager import paging
from cwm_server.manager.catalog.base import NewChunk, WindowExists, basic_view
from cwm_server.manager.catalog.keyed import KeyedCatalog, KeyRow
from cwm_server.manager.keyed.checks import (
    MAX_KEYS_PER_GET,
    MAX_KEYS_PER_LOOKUP,
    MAX_PART_BYTES,
    check_key,
    check_keys,
    key_not_found,
)
from cwm_server.manager.keyed.put import KeyedPut
from cwm_server.manager.windows.checks import expiry_from_ttl
from cwm_server.manager.windows.header import validate_header, window_info
from cwm_server.manager.windows.manager import WindowManager, window_exists_error
from cwm_server.manager.windows.wire import part_size

log = structlog.get_logger("cwm.keyed")


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

    async def put(
        self, tenant: str, requests: AsyncIterator[pb.PutKeyedChunksRequest]
    ) -> pb.PutKeyedChunksResponse:
        """Store a stream of values (`put.KeyedPut`); FAILED_PRECONDITION before a byte is
        received if this manager keeps no key rows."""
        return await KeyedPut(self._manager, self.catalog, tenant).run(requests)

    # -- get --------------------------------------------------------------------------------

    async def get(
        self, tenant: str, request: pb.GetKeyedChunksRequest
    ) -> AsyncIterator[pb.GetKeyedChunksResponse]:
        """The values of `request.keys` as parts on the stream."""
        read = await self.open_read(tenant, request)
        try:
            async for response in read.parts():
                yield response
        finally:
            read.close()

    async def open_read(self, tenant: str, request: pb.GetKeyedChunksRequest) -> KeyedRead:
        """The keys' rows looked up and their chunks pinned until `KeyedRead.close`."""
        keys = check_keys(request.keys, MAX_KEYS_PER_GET)
        manager = self._manager
        part_bytes = part_size(
            request.max_part_bytes, manager.config.part_bytes, ceiling=MAX_PART_BYTES
        )
        rows: dict[str, KeyRow] = await manager.db(self.catalog.get_keys, tenant, keys)
        pins = manager.pin(tenant, [row.digest for row in rows.values()])
        return KeyedRead(manager, tenant, keys, rows, pins, part_bytes)

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
            window = window_info(tenant, header, spans, known, expires)
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


class KeyedRead:
    """One GetKeyedChunks call's keys, their rows and pins: the values as parts on the
    stream (`parts`), or, for a bulk connection, a head per key on the stream (`heads`)
    and the found values' bytes in request order (`refs`, `fetched`)."""

    def __init__(
        self,
        manager: WindowManager,
        tenant: str,
        keys: Sequence[str],
        rows: dict[str, KeyRow],
        pins: Any,
        part_bytes: int,
    ) -> None:
        self._manager = manager
        self._tenant = tenant
        self._keys = list(keys)
        self._rows = rows
        self._pins = pins
        self._part_bytes = part_bytes
        self.refs = [
            pb.ChunkRef(index=position, digest=row.digest, raw_size=row.raw_size)
            for position, key in enumerate(self._keys)
            if (row := rows.get(key)) is not None
        ]
        """The found values as chunk refs: index = the key's position in the request."""

    def close(self) -> None:
        self._manager.unpin(self._pins)

    def heads(self) -> list[pb.GetKeyedChunksResponse]:
        """One message per key, in order: found or not, digest, size and metadata, no data."""
        heads = []
        for key in self._keys:
            row = self._rows.get(key)
            if row is None:
                heads.append(pb.GetKeyedChunksResponse(part=pb.KeyedChunkPart(key=key)))
                continue
            part = pb.KeyedChunkPart(
                key=key, digest=row.digest, raw_size=row.raw_size, metadata=row.metadata
            )
            heads.append(pb.GetKeyedChunksResponse(part=part, found=True))
        return heads

    async def parts(self) -> AsyncIterator[pb.GetKeyedChunksResponse]:
        manager = self._manager
        part_bytes = self._part_bytes
        for key in self._keys:
            row = self._rows.get(key)
            if row is None:
                yield pb.GetKeyedChunksResponse(part=pb.KeyedChunkPart(key=key), found=False)
                continue
            raw = await manager.io(self._read, key, row)
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

    async def fetched(
        self, read_ahead: int
    ) -> AsyncIterator[tuple[pb.ChunkRef, int, bytes | memoryview]]:
        """The found values' raw bytes in order, at most `read_ahead` read at once."""
        manager = self._manager
        pending: deque[tuple[pb.ChunkRef, asyncio.Future[bytes]]] = deque()
        refs = iter(self.refs)

        def refill() -> None:
            while len(pending) < max(1, read_ahead):
                ref = next(refs, None)
                if ref is None:
                    return
                key = self._keys[ref.index]
                read = manager.submit_io(self._read, key, self._rows[key])
                pending.append((ref, asyncio.wrap_future(read)))

        refill()
        try:
            while pending:
                ref, future = pending.popleft()
                raw = await future
                refill()
                yield ref, pb.ChunkCodec.CHUNK_CODEC_RAW, raw
                del raw
        finally:
            for _, future in pending:
                future.cancel()

    def _read(self, key: str, row: KeyRow) -> bytes:
        raw: bytes = self._manager.store.get(self._tenant, row.digest, f"key {key[:80]!r}")
        return raw
