"""asyncio client for KeyedChunkService, the twin of `keyed.sync_client.KeyedChunkClient`;
both send and check through `keyed.values`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import grpc

from cwm_client import pb
from cwm_client.chunks import DEFAULT_PART_BYTES
from cwm_client.errors import from_rpc_error
from cwm_client.keyed.values import (
    KeyedValue,
    ValueAssembler,
    key_batches,
    promote_request,
    put_requests,
)
from cwm_client.service_client import AsyncServiceClient


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

    async def get(self, keys: Sequence[str], *, part_bytes: int = 0) -> list[KeyedValue | None]:
        found: list[KeyedValue | None] = []
        for batch in key_batches(keys):
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
