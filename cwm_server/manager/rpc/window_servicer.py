"""WindowService over gRPC: thin methods that unpack a request, call the WindowManager and
pack the answer. Errors are mapped by `interceptors/error_mapping.py`; nothing here catches
them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc.aio

from cwm_client import pb
from cwm_server.manager.bulk.channel import BulkChannel
from cwm_server.manager.rpc.tenancy import current_tenant
from cwm_server.manager.windows.freeze import FreezeStream
from cwm_server.manager.windows.manager import WindowManager
from cwm_server.manager.windows.thaw import open_thaw


class WindowServicer(pb.WindowServiceServicer):
    def __init__(self, manager: WindowManager, bulk: BulkChannel | None = None) -> None:
        self._manager = manager
        self._bulk = bulk

    async def Freeze(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[pb.FreezeRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.FreezeResponse:
        stream = FreezeStream(self._manager, current_tenant(context))
        return await stream.run(request_iterator)

    async def Thaw(  # noqa: N802
        self, request: pb.ThawRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """The window (a ThawResponse), then its chunk parts as wire.PreEncoded
        ThawResponses, which the interceptor's response serializer sends as they are (or,
        where the request asked and the bulk channel can, an offer and the chunks on it)."""
        tenant = current_tenant(context)
        stream = await open_thaw(self._manager, tenant, request)
        try:
            yield pb.ThawResponse(window=stream.window)
            rest = (
                stream.responses()
                if self._bulk is None
                else self._bulk.thaw(stream, request, tenant, context.peer())
            )
            async for response in rest:
                yield response
        finally:
            stream.close()

    async def OfferBulkFreeze(  # noqa: N802
        self, request: pb.OfferBulkFreezeRequest, context: grpc.aio.ServicerContext
    ) -> pb.OfferBulkFreezeResponse:
        if self._bulk is None:
            return pb.OfferBulkFreezeResponse()
        return await self._bulk.offer_freeze(current_tenant(context), request, context.peer())

    async def FindMissingChunks(  # noqa: N802
        self, request: pb.FindMissingChunksRequest, context: grpc.aio.ServicerContext
    ) -> pb.FindMissingChunksResponse:
        missing = await self._manager.find_missing(current_tenant(context), list(request.digests))
        return pb.FindMissingChunksResponse(missing_digests=missing)

    async def ListWindows(  # noqa: N802
        self, request: pb.ListWindowsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListWindowsResponse:
        windows, token = await self._manager.list(current_tenant(context), request)
        return pb.ListWindowsResponse(windows=windows, next_page_token=token)

    async def GetWindow(  # noqa: N802
        self, request: pb.GetWindowRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetWindowResponse:
        window = await self._manager.get(current_tenant(context), request.name, request.view)
        return pb.GetWindowResponse(window=window)

    async def CloneWindow(  # noqa: N802
        self, request: pb.CloneWindowRequest, context: grpc.aio.ServicerContext
    ) -> pb.CloneWindowResponse:
        window = await self._manager.clone(current_tenant(context), request)
        return pb.CloneWindowResponse(window=window)

    async def DeleteWindow(  # noqa: N802
        self, request: pb.DeleteWindowRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteWindowResponse:
        freed, freed_bytes = await self._manager.delete(current_tenant(context), request.name)
        return pb.DeleteWindowResponse(chunks_freed=freed, bytes_freed=freed_bytes)
