"""Blocking client for WindowService. `async_client.AsyncWindowClient` mirrors it."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import grpc

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


class ThawStream:
    """A running Thaw: `window` first, then iterate for verified chunks in order.

    A thaw read over several streams (see `WindowClient.thaw`) looks the same: one reader
    thread per stream assembles, decodes and verifies its share of the chunks (BLAKE3
    releases the GIL, so the checks overlap) into a queue of at most `read_ahead` chunks,
    and iteration takes chunk k from stream k % N, so chunks still come out in order and the
    client holds a few chunks per stream at most.

    Closing (or leaving the `with` block) cancels the calls, so an abandoned thaw frees the
    manager's streams at once.
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
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        try:
            first = next(call)
        except grpc.RpcError as exc:
            self.close()
            raise from_rpc_error(exc) from None
        except BaseException:
            self.close()
            raise
        self._decoder.accept(first)
        assert self._decoder.window is not None
        self.window: pb.WindowInfo = self._decoder.window
        self._first_chunk = first_chunk
        stride = len(self._calls)
        self._expected = expected_chunks(self.window, first_chunk, chunk_count)
        self._queues: list[queue.Queue[object]] = []
        if stride > 1:
            for i, stream_call in enumerate(self._calls):
                share = expected_chunks(
                    self.window,
                    first_chunk + i,
                    0 if chunk_count == 0 else max(0, chunk_count - i),
                    stride,
                )
                decoder = self._decoder if i == 0 else ThawDecoder(reference=self.window)
                if i:
                    self._decoders.append(decoder)
                shared: queue.Queue[object] = queue.Queue(max(1, read_ahead))
                self._queues.append(shared)
                thread = threading.Thread(
                    target=self._read,
                    args=(stream_call, decoder, share, shared),
                    name=f"cwm-thaw-{i}",
                    daemon=True,
                )
                self._threads.append(thread)
            for thread in self._threads:
                thread.start()

    @property
    def streams(self) -> int:
        """How many streams carry this thaw."""
        return len(self._calls)

    @property
    def encoded_bytes(self) -> int:
        """Chunk bytes received so far, as they came over the wire (encoded)."""
        return sum(decoder.encoded_bytes for decoder in self._decoders)

    def __iter__(self) -> Iterator[ThawedChunk]:
        if len(self._calls) == 1:
            yield from self._iter_one()
            return
        finished = False
        try:
            stride = len(self._calls)
            for position in range(self._expected):
                item = self._take(self._queues[position % stride])
                if isinstance(item, BaseException):
                    raise item
                if item is _END or not isinstance(item, ThawedChunk):
                    raise DataLoss(f"thaw stream {position % stride} ended early")
                if item.index != self._first_chunk + position:
                    raise DataLoss(
                        f"thaw stream {position % stride} sent chunk {item.index} where chunk "
                        f"{self._first_chunk + position} was due"
                    )
                yield item
            for shared in self._queues:
                item = self._take(shared)
                if isinstance(item, BaseException):
                    raise item
                if item is not _END:
                    raise DataLoss("a thaw stream sent more chunks than it was asked for")
            finished = True
        finally:
            if not finished:
                self.close()

    def _iter_one(self) -> Iterator[ThawedChunk]:
        try:
            for message in self._calls[0]:
                chunk = self._decoder.accept(message)
                if chunk is not None:
                    yield chunk
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        self._decoder.finish(self._expected)

    def _read(
        self, call: Any, decoder: ThawDecoder, expected: int, shared: queue.Queue[object]
    ) -> None:
        try:
            for message in call:
                chunk = decoder.accept(message)
                if chunk is not None and not self._put(shared, chunk):
                    return
            decoder.finish(expected)
            self._put(shared, _END)
        except grpc.RpcError as exc:
            if not self._stop.is_set():
                self._put(shared, from_rpc_error(exc))
        except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread
            self._put(shared, exc)

    def _take(self, shared: queue.Queue[object]) -> object:
        while True:
            try:
                return shared.get(timeout=_POLL_S)
            except queue.Empty:
                if self._stop.is_set():
                    raise Cancelled("the thaw was closed while a chunk was awaited") from None

    def _put(self, shared: queue.Queue[object], item: object) -> bool:
        while not self._stop.is_set():
            try:
                shared.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def close(self) -> None:
        self._stop.set()
        for call in self._calls:
            call.cancel()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)

    def __enter__(self) -> ThawStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Client:
    """Channel ownership, context management and error mapping shared by the clients."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        channel: grpc.Channel | None = None,
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
        self._channel = channel or self._credentials.channel(target, CHANNEL_OPTIONS)
        self._timeout = timeout
        self._metadata = (*self._credentials.metadata(), *metadata)
        self._stub = self._new_stub()
        self._extra_channels: list[grpc.Channel] = []
        self._lock = threading.Lock()

    def _new_stub(self) -> Any:
        raise NotImplementedError

    def _channels(self, count: int) -> list[grpc.Channel]:
        """`count` channels for the streams of one parallel transfer: this client's, then
        extra ones to the same target, each its own TCP connection, made on first use and
        kept until close(). A client built on a caller's channel uses only that one."""
        if not self._owns_channel:
            return [self._channel] * count
        with self._lock:
            while len(self._extra_channels) < count - 1:
                self._extra_channels.append(
                    self._credentials.channel(self._target, EXTRA_CHANNEL_OPTIONS)
                )
            return [self._channel, *self._extra_channels[: count - 1]]

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()
            for extra in self._extra_channels:
                extra.close()
            self._extra_channels = []

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _unary(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None


class WindowClient(_Client):
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
    ) -> FreezeResult:
        """Store `chunks` as window `name`; only chunks the manager lacks are sent.

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
        to_send = [c for c in chunks if missing is None or c.digest in missing]
        total = sum(c.raw_size for c in to_send)
        count = auto_streams(total, len(to_send), streams)
        if count == 1:
            requests = freeze_requests(header, to_send, part_bytes, progress, wire_codec)
            response: pb.FreezeResponse = self._unary(self._stub.Freeze, requests)
            return FreezeResult(
                window=response.window,
                chunks_sent=response.chunks_received,
                chunks_reused=response.chunks_reused,
                bytes_sent=response.bytes_received,
            )
        return self._freeze_parallel(header, to_send, count, part_bytes, progress, wire_codec)

    def _freeze_parallel(
        self,
        header: pb.FreezeHeader,
        to_send: Sequence[ChunkPayload],
        count: int,
        part_bytes: int,
        progress: Progress | None,
        wire_codec: int,
    ) -> FreezeResult:
        upload = new_upload_id()
        staging = stage_header(header, upload, stage_only=True)
        sums = ProgressSum(progress, sum(c.raw_size for c in to_send))
        calls: list[Any] = []
        try:
            for i, channel in enumerate(self._channels(count)):
                requests = freeze_requests(
                    staging, to_send[i::count], part_bytes, sums.stream(), wire_codec
                )
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
        commit = iter([pb.FreezeRequest(header=stage_header(header, upload, stage_only=False))])
        response: pb.FreezeResponse = self._unary(self._stub.Freeze, commit)
        return FreezeResult(
            window=response.window,
            chunks_sent=sum(r.chunks_received for r in staged),
            chunks_reused=response.chunks_reused,
            bytes_sent=sum(r.bytes_received for r in staged),
            streams=count,
        )

    def thaw(
        self,
        name: str,
        *,
        first_chunk: int = 0,
        chunk_count: int = 0,
        streams: int | None = None,
        accept_codecs: Sequence[int] = (),
        read_ahead: int = 4,
    ) -> ThawStream:
        """Open a thaw of `name` (or of a range of its chunks); chunks come out in order.

        `streams`: how many streams (each on its own connection) carry the chunks, each a
        stripe of them; None (the default) picks by the window's size and the client's cores
        after a GetWindow to learn the size (`auto_streams`; pass 1 to skip that round trip).
        `accept_codecs` lists codecs this client takes on the wire
        (e.g. `[codecs.LZ4]` over a slow link); empty means raw, fastest on loopback.
        """
        if streams == 1:
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
            return ThawStream(call, first_chunk, chunk_count)
        info = self.get(name, view=pb.WindowView.WINDOW_VIEW_BASIC)
        span = expected_chunks(info, first_chunk, chunk_count)
        share = info.raw_bytes * span // max(1, info.chunk_count)
        count = auto_streams(share, span, streams)
        if count == 1:
            return self.thaw(
                name,
                first_chunk=first_chunk,
                chunk_count=chunk_count,
                streams=1,
                accept_codecs=accept_codecs,
            )
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

    def get(self, name: str, *, view: int = pb.WindowView.WINDOW_VIEW_FULL) -> pb.WindowInfo:
        response: pb.GetWindowResponse = self._unary(
            self._stub.GetWindow,
            pb.GetWindowRequest(name=name, view=view),  # type: ignore[arg-type]
        )
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
            pb.CloneWindowRequest(
                source_name=source_name,
                new_name=new_name,
                description=description,
                tags=dict(tags or {}),
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


class SessionClient(_Client):
    """Blocking SessionService client: agents, live sessions, and freeze/thaw orders."""

    _stub: pb.SessionServiceStub

    def _new_stub(self) -> pb.SessionServiceStub:
        return pb.SessionServiceStub(self._channel)

    def list_agents(self) -> list[pb.AgentInfo]:
        response: pb.ListAgentsResponse = self._unary(self._stub.ListAgents, pb.ListAgentsRequest())
        return list(response.agents)

    def list_sessions(self, agent_id: str = "") -> list[pb.SessionInfo]:
        response: pb.ListSessionsResponse = self._unary(
            self._stub.ListSessions, pb.ListSessionsRequest(agent_id=agent_id)
        )
        return list(response.sessions)

    def freeze_session(
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
        response: pb.FreezeSessionResponse = self._unary(
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

    def thaw_window(
        self, window_name: str, *, agent_id: str = "", new_session_id: str = ""
    ) -> pb.ThawWindowResponse:
        """Order an agent to load `window_name` into a new session; says how to continue."""
        response: pb.ThawWindowResponse = self._unary(
            self._stub.ThawWindow,
            pb.ThawWindowRequest(
                window_name=window_name, agent_id=agent_id, new_session_id=new_session_id
            ),
        )
        return response
