"""SessionService over gRPC: the agents' control streams and the orders sent down them."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import grpc.aio
import structlog

from cwm_client import pb
from cwm_client.errors import Aborted, InvalidArgument
from cwm_client.names import check_window_name
from cwm_server.manager.agents import AgentConnection, AgentRegistry
from cwm_server.manager.rpc.tenancy import current_tenant
from cwm_server.manager.windows.checks import check_labels
from cwm_server.manager.windows.manager import WindowManager

log = structlog.get_logger("cwm.sessions")


class SessionServicer(pb.SessionServiceServicer):
    def __init__(self, manager: WindowManager, registry: AgentRegistry, manager_id: str) -> None:
        self._manager = manager
        self._registry = registry
        self._manager_id = manager_id

    async def Connect(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[pb.ConnectRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ConnectResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("payload") != "hello":
            raise InvalidArgument("the first Connect message must be an AgentHello", field="hello")
        conn = self._registry.register(current_tenant(context), first.hello)
        reader = asyncio.ensure_future(self._read(conn, request_iterator))
        try:
            yield pb.ConnectResponse(welcome=pb.Welcome(manager_id=self._manager_id))
            ended = asyncio.ensure_future(conn.ended.wait())
            try:
                while True:
                    get = asyncio.ensure_future(conn.outbox.get())
                    try:
                        await asyncio.wait(
                            {get, reader, ended}, return_when=asyncio.FIRST_COMPLETED
                        )
                    finally:
                        if not get.done():
                            get.cancel()
                    # Not done: the reader ended first (or the id was taken over) and `get`
                    # was just asked to cancel (it is only "cancelling" until the loop runs
                    # it; its result() would raise).
                    if not get.done() or get.cancelled():
                        break
                    yield pb.ConnectResponse(order=get.result())
            finally:
                ended.cancel()
            if conn.ended.is_set():
                raise Aborted(
                    f"agent id {conn.agent_id!r} was taken over by another connection after "
                    "this one went silent",
                    reason="AGENT_REPLACED",
                )
            reader.result()
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            self._registry.unregister(conn)

    async def _read(
        self, conn: AgentConnection, request_iterator: AsyncIterator[pb.ConnectRequest]
    ) -> None:
        async for message in request_iterator:
            self._registry.heard(conn)
            kind = message.WhichOneof("payload")
            if kind == "sessions":
                self._registry.report_sessions(conn, message.sessions)
            elif kind == "result":
                self._registry.resolve(conn, message.result)
            else:
                raise InvalidArgument(
                    f"unexpected {kind!r} on an established Connect stream", field="payload"
                )

    async def ListAgents(  # noqa: N802
        self, request: pb.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAgentsResponse:
        tenant = current_tenant(context)
        return pb.ListAgentsResponse(agents=[c.info() for c in self._registry.agents(tenant)])

    async def ListSessions(  # noqa: N802
        self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSessionsResponse:
        sessions = self._registry.sessions(current_tenant(context), request.agent_id)
        return pb.ListSessionsResponse(sessions=sessions)

    async def FreezeSession(  # noqa: N802
        self, request: pb.FreezeSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.FreezeSessionResponse:
        check_window_name(request.window_name, "window_name")
        check_labels(request.tags, request.description)
        if not request.session_id:
            raise InvalidArgument("session_id is required", field="session_id")
        conn = self._registry.agent_with_session(
            current_tenant(context), request.session_id, request.agent_id
        )
        order = pb.Order(
            freeze=pb.FreezeOrder(
                session_id=request.session_id,
                window_name=request.window_name,
                description=request.description,
                tags=dict(request.tags),
                ttl_seconds=request.ttl_seconds,
                replace=request.replace,
            )
        )
        result = (await self._registry.order(conn, order)).freeze
        return pb.FreezeSessionResponse(
            window=result.window,
            agent_id=conn.agent_id,
            chunks_sent=result.chunks_sent,
            chunks_reused=result.chunks_reused,
            bytes_sent=result.bytes_sent,
        )

    async def ThawWindow(  # noqa: N802
        self, request: pb.ThawWindowRequest, context: grpc.aio.ServicerContext
    ) -> pb.ThawWindowResponse:
        tenant = current_tenant(context)
        window = await self._manager.get(
            tenant, request.window_name, pb.WindowView.WINDOW_VIEW_FULL
        )
        conn = self._registry.agent_for_window(tenant, window, request.agent_id)
        order = pb.Order(
            thaw=pb.ThawOrder(window_name=window.name, new_session_id=request.new_session_id)
        )
        result = (await self._registry.order(conn, order)).thaw
        log.info("thawed", window=window.name, agent_id=conn.agent_id)
        return pb.ThawWindowResponse(
            session_id=result.session.session_id,
            cache_salt=result.session.cache_salt,
            agent_id=conn.agent_id,
            endpoint=conn.endpoint,
            token_ids=window.token_ids,
            token_count=window.token_count,
            chunks=result.chunks,
            raw_bytes=result.raw_bytes,
            request_fields=result.session.request_fields
            or json.dumps({"cache_salt": result.session.cache_salt}),
        )
