"""Clients for KeyedChunkService: values stored under opaque keys (a KV engine's remote tier,
e.g. LMCache's), kept as verified cwm chunks, and promotable to windows.

`KeyedChunkClient` blocks; `AsyncKeyedChunkClient` is its asyncio twin. Every value read is
checked against its BLAKE3 digest before it is returned: a value that does not match raises
`DataLoss`, it is never handed over.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from cwm_client import pb
from cwm_client.async_client import _AsyncClient
from cwm_client.chunks import DEFAULT_PART_BYTES, digest
from cwm_client.errors import DataLoss, from_rpc_error
from cwm_client.sync_client import _Client

MAX_KEY_BYTES = 1024
"""Longest key the manager accepts, in UTF-8 bytes."""
MAX_KEYS_PER_GET = 1024
"""Most keys one GetKeyedChunks call may name; `get` splits longer lists."""


@dataclass(frozen=True)
class KeyedValue:
    """A value stored (or to store) under a key."""

    key: str
    data: bytes
    metadata: bytes = b""
    """The caller's own description of the value (opaque to cwm; at most 64 KiB)."""
    word_size: int = 0
    """Element size in bytes (1, 2 or 4), a hint for compression on disk; 0 means 1."""
    digest: bytes = field(default=b"")
    """BLAKE3-256 of data; computed when empty."""

    def with_digest(self) -> KeyedValue:
        if self.digest:
            return self
        return KeyedValue(self.key, self.data, self.metadata, self.word_size, digest(self.data))


def put_requests(
    values: Iterable[KeyedValue], part_bytes: int = DEFAULT_PART_BYTES
) -> Iterator[pb.PutKeyedChunksRequest]:
    """The PutKeyedChunks stream for `values`: each value as parts of at most `part_bytes`."""
    for value in values:
        value = value.with_digest()
        view = memoryview(value.data)
        size = len(view)
        for offset in range(0, max(size, 1), part_bytes):
            part = pb.KeyedChunkPart(
                key=value.key, data_offset=offset, data=bytes(view[offset : offset + part_bytes])
            )
            if offset == 0:
                part.digest = value.digest
                part.raw_size = size
                part.metadata = value.metadata
                part.word_size = value.word_size
            yield pb.PutKeyedChunksRequest(part=part)


class ValueAssembler:
    """Puts the parts of a GetKeyedChunks stream back together and verifies each value."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = list(keys)
        self.values: list[KeyedValue | None] = []
        self._head: pb.KeyedChunkPart | None = None
        self._buffer = bytearray()

    def accept(self, response: pb.GetKeyedChunksResponse) -> None:
        part = response.part
        if self._head is None:
            position = len(self.values)
            if position >= len(self._keys) or part.key != self._keys[position]:
                raise DataLoss(f"GetKeyedChunks answered key {part.key[:80]!r} out of order")
            if not response.found:
                self.values.append(None)
                return
            if part.data_offset != 0:
                raise DataLoss(f"value of key {part.key[:80]!r} did not start at offset 0")
            self._head = part
            self._buffer = bytearray()
        elif part.key != self._head.key or part.data_offset != len(self._buffer):
            raise DataLoss(f"value of key {self._head.key[:80]!r}: parts out of order")
        self._buffer += part.data
        head = self._head
        if len(self._buffer) > head.raw_size:
            raise DataLoss(f"value of key {head.key[:80]!r} is longer than its raw_size")
        if len(self._buffer) == head.raw_size:
            data = bytes(self._buffer)
            if digest(data) != head.digest:
                raise DataLoss(
                    f"value of key {head.key[:80]!r} does not match its BLAKE3 digest; refusing it"
                )
            self.values.append(
                KeyedValue(head.key, data, head.metadata, head.word_size, head.digest)
            )
            self._head = None
            self._buffer = bytearray()

    def finish(self) -> list[KeyedValue | None]:
        if self._head is not None or len(self.values) != len(self._keys):
            raise DataLoss(
                f"GetKeyedChunks ended after {len(self.values)} of {len(self._keys)} keys"
            )
        return self.values


def promote_request(
    name: str,
    keys: Sequence[str],
    *,
    fingerprint: pb.ModelFingerprint,
    token_ids: Sequence[int],
    chunk_tokens: int,
    session_id: str = "",
    cache_salt: str = "",
    tags: Mapping[str, str] | None = None,
    description: str = "",
    ttl_seconds: int = 0,
    replace: bool = False,
) -> pb.PromoteKeysToWindowRequest:
    return pb.PromoteKeysToWindowRequest(
        name=name,
        keys=keys,
        token_ids=token_ids,
        chunk_tokens=chunk_tokens,
        fingerprint=fingerprint,
        session_id=session_id,
        cache_salt=cache_salt,
        tags=dict(tags or {}),
        description=description,
        ttl_seconds=ttl_seconds,
        replace=replace,
    )


def _batches(keys: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(keys), size):
        yield list(keys[start : start + size])


class KeyedChunkClient(_Client):
    """Blocking KeyedChunkService client; every failure raises a `cwm_client.errors` class."""

    _stub: pb.KeyedChunkServiceStub

    def _new_stub(self) -> pb.KeyedChunkServiceStub:
        return pb.KeyedChunkServiceStub(self._channel)

    def put(
        self, values: Iterable[KeyedValue], *, part_bytes: int = DEFAULT_PART_BYTES
    ) -> pb.PutKeyedChunksResponse:
        """Store `values` (overwriting existing keys); all or nothing."""
        response: pb.PutKeyedChunksResponse = self._unary(
            self._stub.PutKeyedChunks, put_requests(values, part_bytes)
        )
        return response

    def get(self, keys: Sequence[str], *, part_bytes: int = 0) -> list[KeyedValue | None]:
        """The values of `keys` in order, None where a key does not exist; each verified."""
        found: list[KeyedValue | None] = []
        for batch in _batches(keys, MAX_KEYS_PER_GET):
            assembler = ValueAssembler(batch)
            request = pb.GetKeyedChunksRequest(keys=batch, max_part_bytes=part_bytes)
            try:
                for response in self._stub.GetKeyedChunks(
                    request, timeout=self._timeout, metadata=self._metadata
                ):
                    assembler.accept(response)
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from None
            found += assembler.finish()
        return found

    def contains_prefix(self, keys: Sequence[str]) -> int:
        """How many of `keys`, from the first, exist."""
        response: pb.ContainsPrefixResponse = self._unary(
            self._stub.ContainsPrefix, pb.ContainsPrefixRequest(keys=keys)
        )
        return response.present_count

    def list_page(
        self, *, page_size: int = 0, page_token: str = "", key_prefix: str = ""
    ) -> tuple[list[pb.KeyedChunkInfo], str]:
        response: pb.ListKeysResponse = self._unary(
            self._stub.ListKeys,
            pb.ListKeysRequest(page_size=page_size, page_token=page_token, key_prefix=key_prefix),
        )
        return list(response.keys), response.next_page_token

    def list_keys(self, *, key_prefix: str = "", page_size: int = 0) -> Iterator[pb.KeyedChunkInfo]:
        """Every key (with `key_prefix`), page by page."""
        token = ""
        while True:
            infos, token = self.list_page(
                page_size=page_size, page_token=token, key_prefix=key_prefix
            )
            yield from infos
            if not token:
                return

    def delete(self, keys: Sequence[str]) -> pb.DeleteKeysResponse:
        response: pb.DeleteKeysResponse = self._unary(
            self._stub.DeleteKeys, pb.DeleteKeysRequest(keys=keys)
        )
        return response

    def promote(self, name: str, keys: Sequence[str], **kwargs: Any) -> pb.WindowInfo:
        """Name the values of `keys` (in token order) as window `name`; see
        `promote_request` for the arguments (fingerprint, token_ids, chunk_tokens, ...)."""
        response: pb.PromoteKeysToWindowResponse = self._unary(
            self._stub.PromoteKeysToWindow, promote_request(name, keys, **kwargs)
        )
        return response.window


class AsyncKeyedChunkClient(_AsyncClient):
    """asyncio twin of `KeyedChunkClient`."""

    _stub: pb.KeyedChunkServiceStub

    def _new_stub(self) -> pb.KeyedChunkServiceStub:
        return pb.KeyedChunkServiceStub(self._channel)

    async def put(
        self, values: Iterable[KeyedValue], *, part_bytes: int = DEFAULT_PART_BYTES
    ) -> pb.PutKeyedChunksResponse:
        response: pb.PutKeyedChunksResponse = await self._unary(
            self._stub.PutKeyedChunks, _aiter(put_requests(values, part_bytes))
        )
        return response

    async def get(self, keys: Sequence[str], *, part_bytes: int = 0) -> list[KeyedValue | None]:
        found: list[KeyedValue | None] = []
        for batch in _batches(keys, MAX_KEYS_PER_GET):
            assembler = ValueAssembler(batch)
            request = pb.GetKeyedChunksRequest(keys=batch, max_part_bytes=part_bytes)
            try:
                call: Any = self._stub.GetKeyedChunks(
                    request, timeout=self._timeout, metadata=self._metadata
                )
                async for response in call:
                    assembler.accept(response)
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from None
            found += assembler.finish()
        return found

    async def contains_prefix(self, keys: Sequence[str]) -> int:
        response: pb.ContainsPrefixResponse = await self._unary(
            self._stub.ContainsPrefix, pb.ContainsPrefixRequest(keys=keys)
        )
        return response.present_count

    async def list_page(
        self, *, page_size: int = 0, page_token: str = "", key_prefix: str = ""
    ) -> tuple[list[pb.KeyedChunkInfo], str]:
        response: pb.ListKeysResponse = await self._unary(
            self._stub.ListKeys,
            pb.ListKeysRequest(page_size=page_size, page_token=page_token, key_prefix=key_prefix),
        )
        return list(response.keys), response.next_page_token

    async def list_keys(
        self, *, key_prefix: str = "", page_size: int = 0
    ) -> AsyncIterator[pb.KeyedChunkInfo]:
        token = ""
        while True:
            infos, token = await self.list_page(
                page_size=page_size, page_token=token, key_prefix=key_prefix
            )
            for info in infos:
                yield info
            if not token:
                return

    async def delete(self, keys: Sequence[str]) -> pb.DeleteKeysResponse:
        response: pb.DeleteKeysResponse = await self._unary(
            self._stub.DeleteKeys, pb.DeleteKeysRequest(keys=keys)
        )
        return response

    async def promote(self, name: str, keys: Sequence[str], **kwargs: Any) -> pb.WindowInfo:
        response: pb.PromoteKeysToWindowResponse = await self._unary(
            self._stub.PromoteKeysToWindow, promote_request(name, keys, **kwargs)
        )
        return response.window


async def _aiter(
    items: Iterable[pb.PutKeyedChunksRequest],
) -> AsyncIterator[pb.PutKeyedChunksRequest]:
    for item in items:
        yield item
