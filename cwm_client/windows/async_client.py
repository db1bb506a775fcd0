"""asyncio client for WindowService, the twin of `windows.sync_client.WindowClient`; both
build their requests and plans through the same modules of this folder."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence

import grpc

from cwm_client import pb
from cwm_client.bulk.connection import (
    BulkUnreachable,
    bulk_transports,
    connect,
    no_bulk,
    transport_name,
)
from cwm_client.bulk.freeze_sender import send_plan
from cwm_client.chunks import DEFAULT_CHUNK_TOKENS, DEFAULT_PART_BYTES, ChunkPayload
from cwm_client.codecs import RAW
from cwm_client.errors import from_rpc_error
from cwm_client.service_client import AsyncServiceClient
from cwm_client.windows.async_thaw_stream import AsyncThawStream
from cwm_client.windows.catalog_requests import (
    clone_request,
    get_request,
    list_request,
    thaw_request,
)
from cwm_client.windows.freeze_stream import FreezePlan, FreezeResult, build_header
from cwm_client.windows.parallel import StripedThaw, thaw_streams
from cwm_client.windows.progress import Progress


class AsyncWindowClient(AsyncServiceClient):
    """asyncio WindowService client; every failure raises a `cwm_client.errors` class."""

    _stub: pb.WindowServiceStub

    def _new_stub(self) -> pb.WindowServiceStub:
        return pb.WindowServiceStub(self._channel)

    async def find_missing(self, digests: Sequence[bytes]) -> list[bytes]:
        """The digests among `digests` that the manager does not hold."""
        response: pb.FindMissingChunksResponse = await self._unary(
            self._stub.FindMissingChunks, pb.FindMissingChunksRequest(digests=digests)
        )
        return list(response.missing_digests)

    async def freeze(
        self,
        name: str,
        chunks: Sequence[ChunkPayload],
        *,
        fingerprint: pb.ModelFingerprint,
        token_ids: Sequence[int],
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        session_id: str = "",
        cache_salt: str = "",
        parent: str = "",
        tags: Mapping[str, str] | None = None,
        description: str = "",
        ttl_seconds: int = 0,
        pinned: bool = False,
        replace: bool = False,
        skip_existing: bool = True,
        part_bytes: int = DEFAULT_PART_BYTES,
        progress: Progress | None = None,
        streams: int | None = None,
        wire_codec: int = RAW,
        transport: str = "auto",
    ) -> FreezeResult:
        """Store `chunks` as window `name`; only chunks the manager lacks are sent.

        `streams`, `wire_codec` and `transport` as in `WindowClient.freeze`: several streams
        stage shares of the chunks under one upload id and a last header-only stream
        commits atomically; a bulk connection's sending runs on a worker thread.
        """
        header = build_header(
            name,
            chunks,
            fingerprint=fingerprint,
            token_ids=token_ids,
            chunk_tokens=chunk_tokens,
            session_id=session_id,
            cache_salt=cache_salt,
            parent=parent,
            tags=tags,
            description=description,
            ttl_seconds=ttl_seconds,
            pinned=pinned,
            replace=replace,
        )
        missing = (
            set(await self.find_missing(list(header.chunk_digests)))
            if skip_existing and chunks
            else None
        )
        plan = FreezePlan.choose(header, chunks, missing, streams)
        wanted = bulk_transports(transport, self._owns_channel)
        if wanted and plan.to_send and streams in (None, 1):
            result = await self._bulk_freeze(plan, wanted, progress, wire_codec)
            if result is not None:
                return result
            if transport != "auto":
                raise no_bulk(transport, "freeze")
        if plan.streams == 1:
            requests = plan.requests(part_bytes, progress, wire_codec)
            response: pb.FreezeResponse = await self._unary(self._stub.Freeze, requests)
            return plan.result(response)
        stagings = plan.staging_requests(part_bytes, progress, wire_codec)
        calls = [
            pb.WindowServiceStub(channel).Freeze(
                requests, timeout=self._timeout, metadata=self._metadata
            )
            for channel, requests in zip(self._channels(plan.streams), stagings, strict=True)
        ]
        try:
            staged: list[pb.FreezeResponse] = await asyncio.gather(*calls)
        except grpc.RpcError as exc:
            for call in calls:
                call.cancel()
            raise from_rpc_error(exc) from None
        except BaseException:
            for call in calls:
                call.cancel()
            raise
        response = await self._unary(self._stub.Freeze, plan.commit_requests())
        return plan.parallel_result(staged, response)

    async def thaw(
        self,
        name: str,
        *,
        first_chunk: int = 0,
        chunk_count: int = 0,
        streams: int | None = None,
        accept_codecs: Sequence[int] = (),
        read_ahead: int = 4,
        transport: str = "auto",
    ) -> AsyncThawStream:
        """Open a thaw of `name` (or of a range of its chunks); the window is read already.

        `streams`, `accept_codecs` and `transport` as in `WindowClient.thaw`."""
        request = thaw_request(name, first_chunk, chunk_count, accept_codecs)  # checked now
        wanted = bulk_transports(transport, self._owns_channel)
        if wanted and streams in (None, 1):
            forced = transport != "auto"
            bulk = await self._bulk_thaw(name, first_chunk, chunk_count, accept_codecs, wanted)
            if bulk is not None and not (forced and bulk.transport == "grpc"):
                return bulk
            if bulk is not None:
                bulk.close()
            if forced:
                raise no_bulk(transport, "thaw")
        count = 1
        if streams != 1:
            info = await self.get(name, view=pb.WindowView.WINDOW_VIEW_BASIC)
            count = thaw_streams(info, first_chunk, chunk_count, streams)
        if count == 1:
            call = self._stub.Thaw(
                request,
                timeout=self._timeout,
                metadata=self._metadata,
            )
            return await AsyncThawStream(call, first_chunk, chunk_count).open()
        plan = StripedThaw.plan(name, first_chunk, chunk_count, count, accept_codecs)
        calls = [
            pb.WindowServiceStub(channel).Thaw(
                request, timeout=self._timeout, metadata=self._metadata
            )
            for channel, request in zip(self._channels(count), plan.requests, strict=True)
        ]
        stream = AsyncThawStream(
            calls[0], first_chunk, chunk_count, more_calls=calls[1:], read_ahead=read_ahead
        )
        return await stream.open()

    async def _bulk_thaw(
        self,
        name: str,
        first_chunk: int,
        chunk_count: int,
        accept_codecs: Sequence[int],
        wanted: Sequence[int],
    ) -> AsyncThawStream | None:
        """As `WindowClient._bulk_thaw`: None when the offer could not be taken."""
        call = self._stub.Thaw(
            thaw_request(name, first_chunk, chunk_count, accept_codecs, wanted),
            timeout=self._timeout,
            metadata=self._metadata,
        )
        stream = AsyncThawStream(
            call,
            first_chunk,
            chunk_count,
            bulk_connect=lambda offer: connect(offer, self._target, self._credentials),
        )
        try:
            return await stream.open()
        except BulkUnreachable:
            return None

    async def _bulk_freeze(
        self,
        plan: FreezePlan,
        wanted: Sequence[int],
        progress: Progress | None,
        wire_codec: int,
    ) -> FreezeResult | None:
        """As `WindowClient._bulk_freeze`, the connection's I/O on a worker thread."""
        bulk = plan.for_bulk()
        answer: pb.OfferBulkFreezeResponse = await self._unary(
            self._stub.OfferBulkFreeze, bulk.offer_request(wanted)
        )
        offer = answer.offer
        if offer.transport == pb.BulkTransport.BULK_TRANSPORT_UNSPECIFIED:
            return None
        sent = await asyncio.to_thread(
            send_plan, offer, self._target, self._credentials, plan, progress, wire_codec
        )
        if sent is None:
            return None
        response: pb.FreezeResponse = await self._unary(self._stub.Freeze, bulk.commit_requests())
        return bulk.bulk_result(sent.chunks, sent.encoded_bytes, response, transport_name(offer))

    async def get(self, name: str, *, view: int = pb.WindowView.WINDOW_VIEW_FULL) -> pb.WindowInfo:
        response: pb.GetWindowResponse = await self._unary(
            self._stub.GetWindow, get_request(name, view)
        )
        return response.window

    async def list_page(
        self,
        *,
        page_size: int = 100,
        page_token: str = "",
        name_prefix: str = "",
        session_id: str = "",
        model_id: str = "",
        tags: Mapping[str, str] | None = None,
        search: str = "",
        view: int = pb.WindowView.WINDOW_VIEW_BASIC,
    ) -> tuple[list[pb.WindowInfo], str]:
        """One page of windows and the token of the next ("" on the last page)."""
        response: pb.ListWindowsResponse = await self._unary(
            self._stub.ListWindows,
            list_request(
                page_size=page_size,
                page_token=page_token,
                name_prefix=name_prefix,
                session_id=session_id,
                model_id=model_id,
                tags=tags,
                search=search,
                view=view,
            ),
        )
        return list(response.windows), response.next_page_token

    async def list(
        self,
        *,
        page_size: int = 100,
        name_prefix: str = "",
        session_id: str = "",
        model_id: str = "",
        tags: Mapping[str, str] | None = None,
        search: str = "",
        view: int = pb.WindowView.WINDOW_VIEW_BASIC,
    ) -> AsyncIterator[pb.WindowInfo]:
        """Every matching window, fetching pages as the iteration needs them."""
        token = ""
        while True:
            windows, token = await self.list_page(
                page_size=page_size,
                page_token=token,
                name_prefix=name_prefix,
                session_id=session_id,
                model_id=model_id,
                tags=tags,
                search=search,
                view=view,
            )
            for window in windows:
                yield window
            if not token:
                return

    async def clone(
        self,
        source_name: str,
        new_name: str,
        *,
        description: str = "",
        tags: Mapping[str, str] | None = None,
        ttl_seconds: int = 0,
    ) -> pb.WindowInfo:
        """Branch `source_name` as `new_name`, sharing every chunk (no bytes copied)."""
        response: pb.CloneWindowResponse = await self._unary(
            self._stub.CloneWindow,
            clone_request(
                source_name,
                new_name,
                description=description,
                tags=tags,
                ttl_seconds=ttl_seconds,
            ),
        )
        return response.window

    async def delete(self, name: str) -> pb.DeleteWindowResponse:
        """Delete `name`; chunks no other window uses are collected."""
        response: pb.DeleteWindowResponse = await self._unary(
            self._stub.DeleteWindow, pb.DeleteWindowRequest(name=name)
        )
        return response
