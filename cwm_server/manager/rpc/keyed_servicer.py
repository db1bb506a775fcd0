"""KeyedChunkService over gRPC: thin methods over `keyed.KeyedChunks` (a GetKeyedChunks
that lists bulk transports goes through the bulk channel's offer, as a Thaw does). Errors
are mapped by `interceptors/error_mapping.py`; nothing here catches them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc.aio

from cwm_client import pb
from cwm_server.manager.bulk.channel import BulkChannel
from cwm_server.manager.keyed.chunks import KeyedChunks
from cwm_server.manager.rpc.tenancy import current_tenant
from cwm_server.manager.windows.manager import WindowManager


class KeyedChunkServicer(pb.KeyedChunkServiceServicer):
    def __init__(self, manager: WindowManager, bulk: BulkChannel | None = None) -> None:
        self._keyed = KeyedChunks(manager)
        self._bulk = bulk

    async def PutKeyedChunks(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[pb.PutKeyedChunksRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.PutKeyedChunksResponse:
        return await self._keyed.put(current_tenant(context), request_iterator)

    async def GetKeyedChunks(  # noqa: N802
        self, request: pb.GetKeyedChunksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GetKeyedChunksResponse]:
        tenant = current_tenant(context)
        if self._bulk is None or not request.bulk_transports:
            async for response in self._keyed.get(tenant, request):
                yield response
            return
        read = await self._keyed.open_read(tenant, request)
        try:
            async for response in self._bulk.offered(
                read.refs,
                request.bulk_transports,
                tenant,
                context.peer(),
                lambda offer: [*read.heads(), pb.GetKeyedChunksResponse(bulk=offer)],
                read.fetched,
                read.parts,
                what=f"{len(read.refs)} keyed values",
            ):
                yield response
        finally:
            read.close()

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
