"""Blocking client for WindowService. `windows.async_client.AsyncWindowClient` is its twin;
both build their requests and plans through the same modules of this folder."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

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
from cwm_client.service_client import ServiceClient
from cwm_client.windows.catalog_requests import (
    clone_request,
    get_request,
    list_request,
    thaw_request,
)
from cwm_client.windows.freeze_stream import FreezePlan, FreezeResult, build_header
from cwm_client.windows.parallel import StripedThaw, thaw_streams
from cwm_client.windows.progress import Progress
from cwm_client.windows.thaw_stream import ThawStream


class WindowClient(ServiceClient):
    """Blocking WindowService client; every failure raises a `cwm_client.errors` class."""

    _stub: pb.WindowServiceStub

    def _new_stub(self) -> pb.WindowServiceStub:
        return pb.WindowServiceStub(self._channel)

    def find_missing(self, digests: Sequence[bytes]) -> list[bytes]:
        """The digests among `digests` that the manager does not hold."""
        response: pb.FindMissingChunksResponse = self._unary(
            self._stub.FindMissingChunks, pb.FindMissingChunksRequest(digests=digests)
        )
        return list(response.missing_digests)

    def freeze(
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

        `transport`: as for `thaw` ("auto" sends the chunks on the manager's bulk channel
        where it offers one this client reaches, and commits over gRPC as always; "shm",
        "unix" or "tcp" insist on that transport; "grpc" sends them on the Freeze stream).

        `streams`: how many streams (each on its own connection) carry the chunks; None (the
        default) picks by size and cores (`auto_streams`: one below 64 MiB to send, at most
        one per two client cores). With several, each stages a share of the
        chunks under one upload id and a last header-only stream commits the window, so it
        still appears atomically or not at all. `wire_codec` (e.g. `codecs.LZ4`) sends
        chunks compressed where that pays; raw (the default) is fastest on loopback.
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
            set(self.find_missing(list(header.chunk_digests))) if skip_existing and chunks else None
        )
        plan = FreezePlan.choose(header, chunks, missing, streams)
        wanted = bulk_transports(transport, self._owns_channel)
        if wanted and plan.to_send and streams in (None, 1):
            result = self._bulk_freeze(plan, wanted, progress, wire_codec)
            if result is not None:
                return result
            if transport != "auto":
                raise no_bulk(transport, "freeze")
        if plan.streams == 1:
            requests = plan.requests(part_bytes, progress, wire_codec)
            response: pb.FreezeResponse = self._unary(self._stub.Freeze, requests)
            return plan.result(response)
        return self._freeze_parallel(plan, part_bytes, progress, wire_codec)

    def _freeze_parallel(
        self, plan: FreezePlan, part_bytes: int, progress: Progress | None, wire_codec: int
    ) -> FreezeResult:
        calls: list[Any] = []
        try:
            stagings = plan.staging_requests(part_bytes, progress, wire_codec)
            for channel, requests in zip(self._channels(plan.streams), stagings, strict=True):
                calls.append(
                    pb.WindowServiceStub(channel).Freeze.future(
                        requests, timeout=self._timeout, metadata=self._metadata
                    )
                )
            staged: list[pb.FreezeResponse] = [call.result() for call in calls]
        except grpc.RpcError as exc:
            for call in calls:
                call.cancel()
            raise from_rpc_error(exc) from None
        except BaseException:
            for call in calls:
                call.cancel()
            raise
        response: pb.FreezeResponse = self._unary(self._stub.Freeze, plan.commit_requests())
        return plan.parallel_result(staged, response)

    def thaw(
        self,
        name: str,
        *,
        first_chunk: int = 0,
        chunk_count: int = 0,
        streams: int | None = None,
        accept_codecs: Sequence[int] = (),
        read_ahead: int = 4,
        transport: str = "auto",
    ) -> ThawStream:
        """Open a thaw of `name` (or of a range of its chunks); chunks come out in order.

        `transport`: "auto" takes the manager's bulk channel where it offers one this
        client can reach (on the same host, shared memory for chunks of 4 MiB or more, else
        its Unix socket; elsewhere its bulk TCP port) and goes on over gRPC where not;
        "shm", "unix" or "tcp" insist on that bulk transport (UNAVAILABLE
        if it cannot be had); "grpc" keeps the chunks on the gRPC stream.
        `streams`: how many gRPC streams (each on its own connection) carry the chunks, each
        a stripe of them; None (the default) picks by the window's size and the client's
        cores after a GetWindow to learn the size (`auto_streams`; pass 1 to skip that
        round trip). A bulk transfer uses one connection, so "auto" takes bulk only when
        `streams` is None or 1. `accept_codecs` lists codecs this client takes on the wire
        (e.g. `[codecs.LZ4]` over a slow link); empty means raw, fastest on loopback.
        """
        request = thaw_request(name, first_chunk, chunk_count, accept_codecs)  # checked now
        wanted = bulk_transports(transport, self._owns_channel)
        if wanted and streams in (None, 1):
            forced = transport != "auto"
            stream = self._bulk_thaw(name, first_chunk, chunk_count, accept_codecs, wanted, forced)
            if stream is not None:
                return stream
            if forced:
                raise no_bulk(transport, "thaw")
        count = 1
        if streams != 1:
            info = self.get(name, view=pb.WindowView.WINDOW_VIEW_BASIC)
            count = thaw_streams(info, first_chunk, chunk_count, streams)
        if count == 1:
            call = self._stub.Thaw(
                request,
                timeout=self._timeout,
                metadata=self._metadata,
            )
            return ThawStream(call, first_chunk, chunk_count)
        plan = StripedThaw.plan(name, first_chunk, chunk_count, count, accept_codecs)
        calls = [
            pb.WindowServiceStub(channel).Thaw(
                request, timeout=self._timeout, metadata=self._metadata
            )
            for channel, request in zip(self._channels(count), plan.requests, strict=True)
        ]
        return ThawStream(
            calls[0], first_chunk, chunk_count, more_calls=calls[1:], read_ahead=read_ahead
        )

    def _bulk_thaw(
        self,
        name: str,
        first_chunk: int,
        chunk_count: int,
        accept_codecs: Sequence[int],
        wanted: Sequence[int],
        forced: bool,
    ) -> ThawStream | None:
        """A thaw whose chunks come on the bulk connection the manager offers, or on its
        gRPC stream when the manager offers none; None when the offer could not be taken
        (the call was cancelled: thaw again over gRPC)."""
        call = self._stub.Thaw(
            thaw_request(name, first_chunk, chunk_count, accept_codecs, wanted),
            timeout=self._timeout,
            metadata=self._metadata,
        )
        try:
            stream = ThawStream(
                call,
                first_chunk,
                chunk_count,
                bulk_connect=lambda offer: connect(offer, self._target, self._credentials),
            )
        except BulkUnreachable:
            return None
        if stream.transport == "grpc" and forced:
            stream.close()
            return None
        return stream

    def _bulk_freeze(
        self,
        plan: FreezePlan,
        wanted: Sequence[int],
        progress: Progress | None,
        wire_codec: int,
    ) -> FreezeResult | None:
        """Stage the plan's chunks on a bulk connection, then commit over gRPC; None when
        the manager offers no bulk connection or this client cannot open it (nothing was
        sent: freeze over gRPC instead)."""
        bulk = plan.for_bulk()
        answer: pb.OfferBulkFreezeResponse = self._unary(
            self._stub.OfferBulkFreeze, bulk.offer_request(wanted)
        )
        offer = answer.offer
        if offer.transport == pb.BulkTransport.BULK_TRANSPORT_UNSPECIFIED:
            return None
        sent = send_plan(offer, self._target, self._credentials, plan, progress, wire_codec)
        if sent is None:
            return None
        response: pb.FreezeResponse = self._unary(self._stub.Freeze, bulk.commit_requests())
        return bulk.bulk_result(sent.chunks, sent.encoded_bytes, response, transport_name(offer))

    def get(self, name: str, *, view: int = pb.WindowView.WINDOW_VIEW_FULL) -> pb.WindowInfo:
        response: pb.GetWindowResponse = self._unary(self._stub.GetWindow, get_request(name, view))
        return response.window

    def list_page(
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
        response: pb.ListWindowsResponse = self._unary(
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

    def list(
        self,
        *,
        page_size: int = 100,
        name_prefix: str = "",
        session_id: str = "",
        model_id: str = "",
        tags: Mapping[str, str] | None = None,
        search: str = "",
        view: int = pb.WindowView.WINDOW_VIEW_BASIC,
    ) -> Iterator[pb.WindowInfo]:
        """Every matching window, fetching pages as the iteration needs them."""
        token = ""
        while True:
            windows, token = self.list_page(
                page_size=page_size,
                page_token=token,
                name_prefix=name_prefix,
                session_id=session_id,
                model_id=model_id,
                tags=tags,
                search=search,
                view=view,
            )
            yield from windows
            if not token:
                return

    def clone(
        self,
        source_name: str,
        new_name: str,
        *,
        description: str = "",
        tags: Mapping[str, str] | None = None,
        ttl_seconds: int = 0,
    ) -> pb.WindowInfo:
        """Branch `source_name` as `new_name`, sharing every chunk (no bytes copied)."""
        response: pb.CloneWindowResponse = self._unary(
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

    def delete(self, name: str) -> pb.DeleteWindowResponse:
        """Delete `name`; chunks no other window uses are collected."""
        response: pb.DeleteWindowResponse = self._unary(
            self._stub.DeleteWindow, pb.DeleteWindowRequest(name=name)
        )
        return response
