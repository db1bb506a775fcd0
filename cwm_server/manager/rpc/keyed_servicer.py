"""KeyedChunkService over gRPC: thin methods over `keyed.KeyedChunks`. Errors are mapped by
`interceptors/error_mapping.py`; nothing here catches them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc.aio

from cwm_client import pb
from cwm_server.manager.keyed.chunks import KeyedChunks
from cwm_server.manager.rpc.tenancy import current_tenant
from cwm_server.manager.windows.manager import WindowManager


class KeyedChunkServicer(pb.KeyedChunkServiceServicer):
    def __init__(self, manager: WindowManager) -> None:
        self._keyed = KeyedChunks(manager)

    async def PutKeyedChunks(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[pb.PutKeyedChunksRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.PutKeyedChunksResponse:
        return await self._keyed.put(current_tenant(context), request_iterator)

    async def GetKeyedChunks(  # noqa: N802
        self, request: pb.GetKeyedChunksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GetKeyedChunksResponse]:
        async for response in self._keyed.get(current_tenant(context), request):
            yield response

    async def ContainsPrefix(  # noqa: N802
        self, request: pb.ContainsPrefixRequest, context: grpc.aio.ServicerContext
    ) -> pb.ContainsPrefixResponse:
        count = await self._keyed.contains_prefix(current_tenant(context), request.keys)
        return pb.ContainsPrefixResponse(present_count=count)

    async def ListKeys(  # noqa: N802
        self, request: pb.ListKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListKeysResponse:
        keys, token = await self._keyed.list(current_tenant(context), request)
        return pb.ListKeysResponse(keys=keys, next_page_token=token)

    async def DeleteKeys(  # noqa: N802
        self, request: pb.DeleteKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteKeysResponse:
        return await self._keyed.delete(current_tenant(context), request.keys)

    async def PromoteKeysToWindow(  # noqa: N802
        self, request: pb.PromoteKeysToWindowRequest, context: grpc.aio.ServicerContext
    ) -> pb.PromoteKeysToWindowResponse:
        window = await self._keyed.promote(current_tenant(context), request)
        return pb.PromoteKeysToWindowResponse(window=window)
