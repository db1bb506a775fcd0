"""The eight tools: each a thin call through `cwm_client`'s asyncio clients.

`Bridge` holds the manager address and, while the MCP server runs (its lifespan), one
`AsyncWindowClient` and one `AsyncSessionClient`. Every tool turns a failed call into a
`ToolError` whose text starts with the gRPC code (see `errors.py`); freeze and thaw report
progress before they order the agent and after it answers (the orders are unary RPCs, so
there is nothing finer to report in between).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import grpc
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from cwm_client import AsyncSessionClient, AsyncWindowClient, Credentials, pb
from cwm_client.errors import CwmError, NotFound
from cwm_server.mcp.errors import describe, invalid_argument, tool_errors
from cwm_server.mcp.models import (
    CompletionBody,
    ContinueRequest,
    DeleteResult,
    FreezeResult,
    HealthResult,
    SessionList,
    SessionStatus,
    StatusResult,
    ThawResult,
    WindowList,
    WindowStatus,
    WindowSummary,
    session_summary,
    window_detail,
    window_summary,
)

# Lineage longer than this is cut (with a note); a parent cycle cannot happen through the
# API, but a walk must end whatever the catalog holds.
MAX_LINEAGE = 64
HEALTH_TIMEOUT_S = 10.0

WindowName = Annotated[
    str, Field(description="window name: 1-128 characters from A-Z a-z 0-9 . _ -")
]
Tags = Annotated[
    dict[str, str] | None, Field(description='labels, e.g. {"project": "x"}; at most 64')
]


class Bridge:
    """The MCP tools over one manager. Enter `connected()` (the server's lifespan) first."""

    def __init__(self, manager: str, credentials: Credentials | None = None) -> None:
        self.manager = manager
        self.credentials = credentials or Credentials()
        """The token (and TLS) the bridge calls the manager with: it acts as that tenant."""
        self._windows: AsyncWindowClient | None = None
        self._sessions: AsyncSessionClient | None = None

    @asynccontextmanager
    async def connected(self) -> AsyncIterator[Bridge]:
        """Open the gRPC channels on the running loop; close them when the server stops."""
        self._windows = AsyncWindowClient(self.manager, credentials=self.credentials)
        self._sessions = AsyncSessionClient(self.manager, credentials=self.credentials)
        try:
            yield self
        finally:
            windows, sessions = self._windows, self._sessions
            self._windows = self._sessions = None
            await windows.close()
            await sessions.close()

    @property
    def windows(self) -> AsyncWindowClient:
        if self._windows is None:
            raise RuntimeError("the bridge is not connected (enter Bridge.connected())")
        return self._windows

    @property
    def sessions(self) -> AsyncSessionClient:
        if self._sessions is None:
            raise RuntimeError("the bridge is not connected (enter Bridge.connected())")
        return self._sessions

    async def _endpoints(self) -> dict[str, str]:
        return {a.agent_id: a.endpoint for a in await self.sessions.list_agents()}

    # -- tools ----------------------------------------------------------------------------

    async def window_freeze(
        self,
        session_id: Annotated[
            str, Field(description="live session to freeze (session_list shows them)")
        ],
        window_name: WindowName,
        ctx: Context,
        description: Annotated[str | None, Field(description="free text")] = None,
        tags: Tags = None,
        ttl_seconds: Annotated[
            int | None, Field(ge=0, description="expire after this many seconds; omit: never")
        ] = None,
        agent_id: Annotated[
            str | None,
            Field(description="hosting agent; needed only if several agents report the session"),
        ] = None,
    ) -> FreezeResult:
        await ctx.report_progress(
            0, 2, f"ordering the agent hosting {session_id!r} to freeze it as {window_name!r}"
        )
        with tool_errors(self.manager):
            response = await self.sessions.freeze_session(
                session_id,
                window_name,
                description=description or "",
                tags=tags,
                ttl_seconds=ttl_seconds or 0,
                agent_id=agent_id or "",
            )
        window = response.window
        await ctx.report_progress(
            2,
            2,
            f"window {window.name!r} committed: {window.token_count} tokens in "
            f"{window.chunk_count} chunks ({response.chunks_sent} sent, "
            f"{response.chunks_reused} already stored)",
        )
        return FreezeResult(
            window=window_summary(window),
            agent_id=response.agent_id,
            chunks_sent=response.chunks_sent,
            chunks_reused=response.chunks_reused,
            bytes_sent=response.bytes_sent,
        )

    async def window_thaw(
        self,
        window_name: WindowName,
        ctx: Context,
        agent_id: Annotated[
            str | None,
            Field(description="agent to thaw into; omit to let the manager pick a matching one"),
        ] = None,
        new_session_id: Annotated[
            str | None,
            Field(description="id (= cache_salt) for the new session; omit to get a fresh one"),
        ] = None,
    ) -> ThawResult:
        where = f"agent {agent_id!r}" if agent_id else "an agent whose engine matches"
        await ctx.report_progress(0, 2, f"ordering {where} to load window {window_name!r}")
        with tool_errors(self.manager):
            response = await self.sessions.thaw_window(
                window_name, agent_id=agent_id or "", new_session_id=new_session_id or ""
            )
        await ctx.report_progress(
            2,
            2,
            f"session {response.session_id!r} on {response.agent_id!r} holds "
            f"{response.token_count} tokens ({response.chunks} chunks loaded)",
        )
        return thaw_result(window_name, response)

    async def window_list(
        self,
        tags: Annotated[
            dict[str, str] | None, Field(description="only windows carrying all these tags")
        ] = None,
        model: Annotated[str | None, Field(description="only windows of this model id")] = None,
        session_id: Annotated[
            str | None, Field(description="only windows frozen from this session")
        ] = None,
        search: Annotated[
            str | None, Field(description="text in the name or description (any case)")
        ] = None,
        page_size: Annotated[int, Field(ge=1, le=1000, description="windows per page")] = 100,
        page_token: Annotated[
            str | None, Field(description="next_page_token of the previous page")
        ] = None,
    ) -> WindowList:
        with tool_errors(self.manager):
            windows, token = await self.windows.list_page(
                page_size=page_size,
                page_token=page_token or "",
                session_id=session_id or "",
                model_id=model or "",
                tags=tags,
                search=search or "",
            )
        return WindowList(
            windows=[window_summary(w) for w in windows],
            count=len(windows),
            next_page_token=token or None,
        )

    async def window_status(
        self,
        window_name: Annotated[
            str | None, Field(description="a window: its tokens, chunks and lineage")
        ] = None,
        session_id: Annotated[
            str | None, Field(description="a session: where it is live and its windows")
        ] = None,
    ) -> StatusResult:
        window_name = window_name or None
        session_id = session_id or None
        if (window_name is None) == (session_id is None):
            raise invalid_argument(
                "give exactly one of window_name or session_id "
                f"(got {'both' if window_name is not None else 'neither'})"
            )
        with tool_errors(self.manager):
            if window_name is not None:
                return StatusResult(kind="window", window=await self._window_status(window_name))
            assert session_id is not None
            return StatusResult(kind="session", session=await self._session_status(session_id))

    async def _window_status(self, name: str) -> WindowStatus:
        window = await self.windows.get(name, view=pb.WindowView.WINDOW_VIEW_FULL)
        lineage: list[WindowSummary] = []
        note: str | None = None
        seen = {window.name}
        parent = window.parent
        while parent:
            if parent in seen or len(lineage) >= MAX_LINEAGE:
                note = f"lineage cut at {parent!r} after {len(lineage)} ancestors"
                break
            try:
                ancestor = await self.windows.get(parent, view=pb.WindowView.WINDOW_VIEW_BASIC)
            except NotFound:
                note = f"ancestor {parent!r} no longer exists (deleted or expired)"
                break
            seen.add(parent)
            lineage.append(window_summary(ancestor))
            parent = ancestor.parent
        return WindowStatus(window=window_detail(window), lineage=lineage, lineage_note=note)

    async def _session_status(self, session_id: str) -> SessionStatus:
        endpoints = await self._endpoints()
        hosts = [
            session_summary(s, endpoints)
            for s in await self.sessions.list_sessions()
            if s.session_id == session_id
        ]
        windows = [window_summary(w) async for w in self.windows.list(session_id=session_id)]
        if not hosts and not windows:
            raise ToolError(
                f"NOT_FOUND: no live session {session_id!r} and no window frozen from it — "
                "session_list shows the live sessions, window_list the windows"
            )
        return SessionStatus(session_id=session_id, live=bool(hosts), hosts=hosts, windows=windows)

    async def window_clone(
        self,
        source_window: Annotated[str, Field(description="existing window to branch")],
        new_window_name: WindowName,
        description: Annotated[
            str | None, Field(description="description of the clone; omit: the source's")
        ] = None,
        tags: Annotated[
            dict[str, str] | None, Field(description="tags of the clone; omit: the source's")
        ] = None,
    ) -> WindowSummary:
        with tool_errors(self.manager):
            window = await self.windows.clone(
                source_window, new_window_name, description=description or "", tags=tags
            )
        return window_summary(window)

    async def window_delete(self, window_name: WindowName) -> DeleteResult:
        with tool_errors(self.manager):
            response = await self.windows.delete(window_name)
        return DeleteResult(
            name=window_name,
            deleted=True,
            chunks_freed=response.chunks_freed,
            bytes_freed=response.bytes_freed,
        )

    async def session_list(
        self,
        agent_id: Annotated[str | None, Field(description="only this agent's sessions")] = None,
    ) -> SessionList:
        with tool_errors(self.manager):
            endpoints = await self._endpoints()
            sessions = await self.sessions.list_sessions(agent_id or "")
        return SessionList(
            sessions=[session_summary(s, endpoints) for s in sessions], count=len(sessions)
        )

    async def cwm_health(self) -> HealthResult:
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                agents = await self.sessions.list_agents()
                count = 0
                async for _ in self.windows.list(page_size=1000):
                    count += 1
        except CwmError as exc:
            # A manager that answered with a refusal (a bad or missing token, a role that
            # may not list) was reached: only no answer at all is "unreachable".
            answered = exc.code not in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
            return _unreachable(
                self.manager, describe(exc, self.manager, hint=False), reachable=answered
            )
        except TimeoutError:
            return _unreachable(
                self.manager, f"DEADLINE_EXCEEDED: no answer within {HEALTH_TIMEOUT_S:.0f} s"
            )
        return HealthResult(
            manager=self.manager,
            reachable=True,
            agents=len(agents),
            agent_ids=[a.agent_id for a in agents],
            windows=count,
            error=None,
        )


def _unreachable(manager: str, error: str, reachable: bool = False) -> HealthResult:
    return HealthResult(
        manager=manager, reachable=reachable, agents=0, agent_ids=[], windows=0, error=error
    )


def thaw_result(window_name: str, response: pb.ThawWindowResponse) -> ThawResult:
    tokens = int(response.token_count)
    endpoint = response.endpoint.rstrip("/")
    note = (
        f"POST body as JSON to url, after appending your new token ids to body.prompt. The "
        f"first {tokens} tokens are served from the thawed cache (the reply's "
        f"usage.prompt_tokens_details.cached_tokens says {tokens}); only new tokens are "
        "computed. Send the same fields (all of body but prompt and max_tokens) with every "
        "later request of this session."
    )
    fields = json.loads(response.request_fields or "{}")
    fields.setdefault("cache_salt", response.cache_salt)
    if not endpoint:
        note = "the agent reported no HTTP endpoint; ask its operator how to reach the engine"
    return ThawResult(
        window=window_name,
        session_id=response.session_id,
        cache_salt=response.cache_salt,
        agent_id=response.agent_id,
        endpoint=endpoint,
        tokens=tokens,
        chunks=response.chunks,
        raw_bytes=response.raw_bytes,
        continue_with=ContinueRequest(
            url=f"{endpoint}/v1/completions" if endpoint else "",
            body=CompletionBody(**fields, prompt=list(response.token_ids)),
            note=note,
        ),
    )
