"""asyncio client for KeyedChunkService, the twin of `keyed.sync_client.KeyedChunkClient`;
both send and check through `keyed.values`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import grpc

from cwm_client import pb
from cwm_client.bulk.connection import bulk_transports, connect, no_bulk
from cwm_client.bulk.thaw_reader import BulkEnded
from cwm_client.chunks import DEFAULT_PART_BYTES
from cwm_client.errors import DataLoss, from_rpc_error
from cwm_client.keyed.bulk_values import KeyedGetStream
from cwm_client.keyed.values import (
    KeyedValue,
    ValueAssembler,
    key_batches,
    promote_request,
    put_requests,
)
from cwm_client.service_client import AsyncServiceClient
from cwm_client.thawed import ThawedChunk


class AsyncKeyedChunkClient(AsyncServiceClient):
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

    async def get(
        self, keys: Sequence[str], *, part_bytes: int = 0, transport: str = "auto"
    ) -> list[KeyedValue | None]:
        """As `KeyedChunkClient.get`."""
        wanted = bulk_transports(transport, self._owns_channel)
        found: list[KeyedValue | None] = []
        for batch in key_batches(keys):
            values = await self._bulk_get(batch, part_bytes, wanted) if wanted else None
            if values is None:
                if transport != "auto" and wanted:
                    raise no_bulk(transport, "read of keyed values")
                values = await self._grpc_get(batch, part_bytes)
            found += values
        return found

    async def _grpc_get(self, batch: list[str], part_bytes: int) -> list[KeyedValue | None]:
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
        return assembler.finish()

    async def _bulk_get(
        self, batch: list[str], part_bytes: int, wanted: Sequence[int]
    ) -> list[KeyedValue | None] | None:
        """As `KeyedChunkClient._bulk_get`; the connection is read on a worker thread."""
        request = pb.GetKeyedChunksRequest(
            keys=batch,
            max_part_bytes=part_bytes,
            bulk_transports=wanted,  # type: ignore[arg-type]
        )
        reading = KeyedGetStream(batch)
        call: Any = self._stub.GetKeyedChunks(
            request, timeout=self._timeout, metadata=self._metadata
        )
        try:
            offered = False
            async for response in call:
                if reading.accept(response):
                    offered = True
                    break
            if not offered:
                return reading.finish_parts()
            assert reading.offer is not None
            try:
                sock = await asyncio.to_thread(
                    connect, reading.offer, self._target, self._credentials
                )
            except OSError:
                call.cancel()
                return None

            def read_all() -> list[ThawedChunk]:
                reader = reading.reader(sock)
                try:
                    return list(reader)
                finally:
                    reader.close()

            try:
                chunks = await asyncio.to_thread(read_all)
            except BulkEnded:
                async for _ in call:  # the call's status says why the connection ended
                    break
                raise
            async for _ in call:
                raise DataLoss("GetKeyedChunks sent a message after its bulk offer")
            return reading.values(chunks)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

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
