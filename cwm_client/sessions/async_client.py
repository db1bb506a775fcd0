"""asyncio client for SessionService, the twin of `sessions.sync_client.SessionClient`."""

from __future__ import annotations

from collections.abc import Mapping

from cwm_client import pb
from cwm_client.service_client import AsyncServiceClient
from cwm_client.sessions.requests import freeze_session_request, thaw_window_request


class AsyncSessionClient(AsyncServiceClient):
    """asyncio SessionService client, the twin of `SessionClient`."""

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
        replace: bool = False,
    ) -> pb.FreezeSessionResponse:
        """Order the agent hosting `session_id` to freeze it as `window_name`."""
        response: pb.FreezeSessionResponse = await self._unary(
            self._stub.FreezeSession,
            freeze_session_request(
                session_id,
                window_name,
                description=description,
                tags=tags,
                ttl_seconds=ttl_seconds,
                agent_id=agent_id,
                replace=replace,
            ),
        )
        return response

    async def thaw_window(
        self, window_name: str, *, agent_id: str = "", new_session_id: str = ""
    ) -> pb.ThawWindowResponse:
        """Order an agent to load `window_name` into a new session; says how to continue."""
        response: pb.ThawWindowResponse = await self._unary(
            self._stub.ThawWindow,
            thaw_window_request(window_name, agent_id=agent_id, new_session_id=new_session_id),
        )
        return response
