"""asyncio client for WindowService, the twin of `sync_client.WindowClient`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import grpc
import grpc.aio
from grpc.aio import EOF  # type: ignore[attr-defined]

from cwm_client import pb
from cwm_client._common import (
    CHANNEL_OPTIONS,
    DEFAULT_TARGET,
    EXTRA_CHANNEL_OPTIONS,
    Credentials,
    FreezeResult,
    Progress,
    ProgressSum,
    StripedThaw,
    ThawDecoder,
    ThawedChunk,
    auto_streams,
    build_header,
    expected_chunks,
    freeze_requests,
    list_request,
    new_upload_id,
    resolve_credentials,
    stage_header,
)
from cwm_client.chunks import DEFAULT_CHUNK_TOKENS, DEFAULT_PART_BYTES, ChunkPayload
from cwm_client.codecs import RAW
from cwm_client.errors import Cancelled, DataLoss, from_rpc_error

_END = object()
_POLL_S = 0.1


class AsyncThawStream:
    """A running Thaw: `await open()` reads the window, then `async for` the chunks.

    Over several streams (see `AsyncWindowClient.thaw`), one task per stream reads its share
    of the chunks, assembles and verifies them (the BLAKE3 check on a worker thread, so the
    streams' checks overlap) into a queue of at most `read_ahead` chunks, and iteration
    takes chunk k from stream k % N: chunks still come out in order.
    """

    def __init__(
        self,
        call: Any,
        first_chunk: int,
        chunk_count: int,
        *,
        more_calls: Sequence[Any] = (),
        read_ahead: int = 4,
    ) -> None:
        self._calls = [call, *more_calls]
        self._decoder = ThawDecoder()
        self._decoders = [self._decoder]
        self._first_chunk = first_chunk
        self._chunk_count = chunk_count
        self._read_ahead = max(1, read_ahead)
        self._expected = 0
        self._queues: list[asyncio.Queue[object]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.window = pb.WindowInfo()

    async def open(self) -> AsyncThawStream:
        try:
            first = await self._calls[0].read()
        except grpc.RpcError as exc:
            self.close()
            raise from_rpc_error(exc) from None
        if first is EOF:
            self.close()
            raise DataLoss("thaw stream ended before the window info")
        self._decoder.accept(first)
        assert self._decoder.window is not None
        self.window = self._decoder.window
        self._expected = expected_chunks(self.window, self._first_chunk, self._chunk_count)
        stride = len(self._calls)
        if stride > 1:
            for i, call in enumerate(self._calls):
                share = expected_chunks(
                    self.window,
                    self._first_chunk + i,
                    0 if self._chunk_count == 0 else max(0, self._chunk_count - i),
                    stride,
                )
                decoder = self._decoder if i == 0 else ThawDecoder(reference=self.window)
                if i:
                    self._decoders.append(decoder)
                shared: asyncio.Queue[object] = asyncio.Queue(self._read_ahead)
                self._queues.append(shared)
                self._tasks.append(asyncio.ensure_future(self._read(call, decoder, share, shared)))
        return self

    @property
    def streams(self) -> int:
        """How many streams carry this thaw."""
        return len(self._calls)

    @property
    def encoded_bytes(self) -> int:
        """Chunk bytes received so far, as they came over the wire (encoded)."""
        return sum(decoder.encoded_bytes for decoder in self._decoders)

    async def __aiter__(self) -> AsyncIterator[ThawedChunk]:
        if len(self._calls) == 1:
            async for chunk in self._iter_one():
                yield chunk
            return
        finished = False
        stride = len(self._calls)
        try:
            for position in range(self._expected):
                item = await self._take(self._queues[position % stride])
                if isinstance(item, BaseException):
                    raise item
                if not isinstance(item, ThawedChunk):
                    raise DataLoss(f"thaw stream {position % stride} ended early")
                if item.index != self._first_chunk + position:
                    raise DataLoss(
                        f"thaw stream {position % stride} sent chunk {item.index} where chunk "
                        f"{self._first_chunk + position} was due"
                    )
                yield item
            for shared in self._queues:
                item = await self._take(shared)
                if isinstance(item, BaseException):
                    raise item
                if item is not _END:
                    raise DataLoss("a thaw stream sent more chunks than it was asked for")
            finished = True
        finally:
            if not finished:
                self.close()

    async def _iter_one(self) -> AsyncIterator[ThawedChunk]:
        try:
            while True:
                message = await self._calls[0].read()
                if message is EOF:
                    break
                chunk = self._decoder.accept(message)
                if chunk is not None:
                    yield chunk
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        self._decoder.finish(self._expected)

    async def _read(
        self, call: Any, decoder: ThawDecoder, expected: int, shared: asyncio.Queue[object]
    ) -> None:
        try:
            while True:
                message = await call.read()
                if message is EOF:
                    break
                if (
                    message.WhichOneof("payload") == "chunk"
                    and message.chunk.encoded_size > 1 << 16
                ):
                    chunk = await asyncio.to_thread(decoder.accept, message)
                else:
                    chunk = decoder.accept(message)
                if chunk is not None:
                    await shared.put(chunk)
            decoder.finish(expected)
            await shared.put(_END)
        except grpc.RpcError as exc:
            await shared.put(from_rpc_error(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the consuming task
            await shared.put(exc)

    async def _take(self, shared: asyncio.Queue[object]) -> object:
        while True:
            try:
                async with asyncio.timeout(_POLL_S):  # not wait_for: it can swallow a cancel
                    return await shared.get()
            except TimeoutError:
                if self._closed:
                    raise Cancelled("the thaw was closed while a chunk was awaited") from None

    def close(self) -> None:
        self._closed = True
        for call in self._calls:
            call.cancel()
        for task in self._tasks:
            task.cancel()

    async def __aenter__(self) -> AsyncThawStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _AsyncClient:
    """Channel ownership, context management and error mapping shared by the clients."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        channel: grpc.aio.Channel | None = None,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        token: str | None = None,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        """`token` is sent as ``authorization: Bearer`` on every call; `root_certificates`
        (the CA of the manager's certificate), `certificate_chain` and `private_key` (a
        client certificate, for mutual TLS) make the channel TLS. `credentials` bundles
        the same (the keyword options win)."""
        self._credentials = resolve_credentials(
            credentials, token, root_certificates, certificate_chain, private_key
        )
        self._owns_channel = channel is None
        self._target = target
        self._channel = channel or self._credentials.aio_channel(target, CHANNEL_OPTIONS)
        self._timeout = timeout
        self._metadata = (*self._credentials.metadata(), *metadata)
        self._stub = self._new_stub()
        self._extra_channels: list[grpc.aio.Channel] = []

    def _new_stub(self) -> Any:
        raise NotImplementedError

    def _channels(self, count: int) -> list[grpc.aio.Channel]:
        """`count` channels for the streams of one parallel transfer: this client's, then
        extra ones to the same target, each its own TCP connection, made on first use and
        kept until close(). A client built on a caller's channel uses only that one."""
        if not self._owns_channel:
            return [self._channel] * count
        while len(self._extra_channels) < count - 1:
            self._extra_channels.append(
                self._credentials.aio_channel(self._target, EXTRA_CHANNEL_OPTIONS)
            )
        return [self._channel, *self._extra_channels[: count - 1]]

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close(None)
            for extra in self._extra_channels:
                await extra.close(None)
            self._extra_channels = []

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _unary(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None


class AsyncWindowClient(_AsyncClient):
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
    ) -> FreezeResult:
        """Store `chunks` as window `name`; only chunks the manager lacks are sent.

        `streams` and `wire_codec` as in `WindowClient.freeze`: several streams stage shares
        of the chunks under one upload id and a last header-only stream commits atomically.
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
        to_send = [c for c in chunks if missing is None or c.digest in missing]
        count = auto_streams(sum(c.raw_size for c in to_send), len(to_send), streams)
        if count == 1:
            requests = freeze_requests(header, to_send, part_bytes, progress, wire_codec)
            response: pb.FreezeResponse = await self._unary(self._stub.Freeze, requests)
            return FreezeResult(
                window=response.window,
                chunks_sent=response.chunks_received,
                chunks_reused=response.chunks_reused,
                bytes_sent=response.bytes_received,
            )
        upload = new_upload_id()
        staging = stage_header(header, upload, stage_only=True)
        sums = ProgressSum(progress, sum(c.raw_size for c in to_send))
        calls = [
            pb.WindowServiceStub(channel).Freeze(
                freeze_requests(staging, to_send[i::count], part_bytes, sums.stream(), wire_codec),
                timeout=self._timeout,
                metadata=self._metadata,
            )
            for i, channel in enumerate(self._channels(count))
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
        commit = [pb.FreezeRequest(header=stage_header(header, upload, stage_only=False))]
        response = await self._unary(self._stub.Freeze, iter(commit))
        return FreezeResult(
            window=response.window,
            chunks_sent=sum(r.chunks_received for r in staged),
            chunks_reused=response.chunks_reused,
            bytes_sent=sum(r.bytes_received for r in staged),
            streams=count,
        )

    async def thaw(
        self,
        name: str,
        *,
        first_chunk: int = 0,
        chunk_count: int = 0,
        streams: int | None = None,
        accept_codecs: Sequence[int] = (),
        read_ahead: int = 4,
    ) -> AsyncThawStream:
        """Open a thaw of `name` (or of a range of its chunks); the window is read already.

        `streams` and `accept_codecs` as in `WindowClient.thaw`."""
        if streams != 1:
            info = await self.get(name, view=pb.WindowView.WINDOW_VIEW_BASIC)
            span = expected_chunks(info, first_chunk, chunk_count)
            count = auto_streams(info.raw_bytes * span // max(1, info.chunk_count), span, streams)
            if count > 1:
                plan = StripedThaw.plan(name, first_chunk, chunk_count, count, accept_codecs)
                calls = [
                    pb.WindowServiceStub(channel).Thaw(
                        request, timeout=self._timeout, metadata=self._metadata
                    )
                    for channel, request in zip(self._channels(count), plan.requests, strict=True)
                ]
                stream = AsyncThawStream(
                    calls[0],
                    first_chunk,
                    chunk_count,
                    more_calls=calls[1:],
                    read_ahead=read_ahead,
                )
                return await stream.open()
        call = self._stub.Thaw(
            pb.ThawRequest(
                name=name,
                first_chunk=first_chunk,
                chunk_count=chunk_count,
                accept_codecs=accept_codecs,  # type: ignore[arg-type]
            ),
            timeout=self._timeout,
            metadata=self._metadata,
        )
        return await AsyncThawStream(call, first_chunk, chunk_count).open()

    async def get(self, name: str, *, view: int = pb.WindowView.WINDOW_VIEW_FULL) -> pb.WindowInfo:
        response: pb.GetWindowResponse = await self._unary(
            self._stub.GetWindow,
            pb.GetWindowRequest(name=name, view=view),  # type: ignore[arg-type]
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
            pb.CloneWindowRequest(
                source_name=source_name,
                new_name=new_name,
                description=description,
                tags=dict(tags or {}),
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


class AsyncSessionClient(_AsyncClient):
    """asyncio SessionService client, the twin of `sync_client.SessionClient`."""

    _stub: pb.SessionServiceStub

    def _new_stub(self) -> pb.SessionServiceStub:
        return pb.SessionServiceStub(self._channel)

    async def list_agents(self) -> list[pb.AgentInfo]:
        response: pb.ListAgentsResponse = await self._unary(
            self._stub.ListAgents, pb.ListAgentsRequest()
        )
        return list(response.agents)

    async def list_sessions(self, agent_id: str = "") -> list[pb.SessionInfo]:
        response: pb.ListSessionsResponse = await self._unary(
            self._stub.ListSessions, pb.ListSessionsRequest(agent_id=agent_id)
        )
        return list(response.sessions)

    async def freeze_session(
        self,
        session_id: str,
        window_name: str,
        *,
        description: str = "",
        tags: Mapping[str, str] | None = None,
        ttl_seconds: int = 0,
        agent_id: str = "",
    ) -> pb.FreezeSessionResponse:
        """Order the agent hosting `session_id` to freeze it as `window_name`."""
        response: pb.FreezeSessionResponse = await self._unary(
            self._stub.FreezeSession,
            pb.FreezeSessionRequest(
                session_id=session_id,
                window_name=window_name,
                description=description,
                tags=dict(tags or {}),
                ttl_seconds=ttl_seconds,
                agent_id=agent_id,
            ),
        )
        return response

    async def thaw_window(
        self, window_name: str, *, agent_id: str = "", new_session_id: str = ""
    ) -> pb.ThawWindowResponse:
        """Order an agent to load `window_name` into a new session; says how to continue."""
        response: pb.ThawWindowResponse = await self._unary(
            self._stub.ThawWindow,
            pb.ThawWindowRequest(
                window_name=window_name, agent_id=agent_id, new_session_id=new_session_id
            ),
        )
        return response
