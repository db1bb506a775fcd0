"""Blocking client for WindowService. `async_client.AsyncWindowClient` mirrors it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import grpc

from cwm_client import pb
from cwm_client._common import (
    CHANNEL_OPTIONS,
    DEFAULT_TARGET,
    FreezeResult,
    Progress,
    ThawDecoder,
    ThawedChunk,
    build_header,
    expected_chunks,
    freeze_requests,
    list_request,
)
from cwm_client.chunks import DEFAULT_CHUNK_TOKENS, DEFAULT_PART_BYTES, ChunkPayload
from cwm_client.errors import from_rpc_error


class ThawStream:
    """A running Thaw: `window` first, then iterate for verified chunks in order.

    Closing (or leaving the `with` block) cancels the call, so an abandoned thaw frees the
    manager's stream at once.
    """

    def __init__(self, call: Any, first_chunk: int, chunk_count: int) -> None:
        self._call = call
        self._decoder = ThawDecoder()
        try:
            first = next(call)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        self._decoder.accept(first)
        assert self._decoder.window is not None
        self.window: pb.WindowInfo = self._decoder.window
        self._expected = expected_chunks(self.window, first_chunk, chunk_count)

    def __iter__(self) -> Iterator[ThawedChunk]:
        try:
            for message in self._call:
                chunk = self._decoder.accept(message)
                if chunk is not None:
                    yield chunk
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        self._decoder.finish(self._expected)

    def close(self) -> None:
        self._call.cancel()

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
    ) -> None:
        self._owns_channel = channel is None
        self._channel = channel or grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._timeout = timeout
        self._metadata = tuple(metadata)
        self._stub = self._new_stub()

    def _new_stub(self) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()

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
    ) -> FreezeResult:
        """Store `chunks` as window `name`; only chunks the manager lacks are sent."""
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
        requests = freeze_requests(header, to_send, part_bytes, progress)
        response: pb.FreezeResponse = self._unary(self._stub.Freeze, requests)
        return FreezeResult(
            window=response.window,
            chunks_sent=response.chunks_received,
            chunks_reused=response.chunks_reused,
            bytes_sent=response.bytes_received,
        )

    def thaw(self, name: str, *, first_chunk: int = 0, chunk_count: int = 0) -> ThawStream:
        """Open a thaw of `name` (or of a range of its chunks)."""
        call = self._stub.Thaw(
            pb.ThawRequest(name=name, first_chunk=first_chunk, chunk_count=chunk_count),
            timeout=self._timeout,
            metadata=self._metadata,
        )
        return ThawStream(call, first_chunk, chunk_count)

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
