"""The registry of connected agents: their sessions, and the orders in flight to them.

An order is a future the manager awaits; the agent's OrderResult resolves it. If the agent
disconnects, every order it had not answered fails with UNAVAILABLE at once, so no caller
waits for an answer that cannot come.

Every agent belongs to the tenant it authenticated as, and every query names a tenant: an
agent id is unique within its tenant only, and another tenant's agents and sessions are
looked up exactly like absent ones (the same lookups, the same errors).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import grpc
import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from cwm_client import pb
from cwm_client.errors import (
    AlreadyExists,
    CwmError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    error_class,
)
from cwm_client.fingerprints import fingerprint_differences
from cwm_server.manager.windows.checks import now_timestamp

log = structlog.get_logger("cwm.agents")

ORDER_TIMEOUT_S = 600.0
SILENT_AFTER_S = 30.0
"""An agent not heard from for this long (no report, no result: a live one reports at
least every `cwm_server.agent.host_agent.HEARTBEAT_S`) may be taken over by another
connection with its id; a live one may not."""
_CODES = {c.value[0]: c for c in grpc.StatusCode}


@dataclass
class AgentConnection:
    tenant: str
    agent_id: str
    fingerprint: pb.ModelFingerprint
    endpoint: str
    connected_at: Timestamp
    outbox: asyncio.Queue[pb.Order] = field(default_factory=asyncio.Queue)
    sessions: dict[str, pb.SessionInfo] = field(default_factory=dict)
    pending: dict[str, asyncio.Future[pb.OrderResult]] = field(default_factory=dict)
    heard_at: float = field(default_factory=time.monotonic)
    """When the agent last sent anything (its hello, a report, a result)."""
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when another connection took this agent id over: its Connect stream ends."""

    def info(self) -> pb.AgentInfo:
        return pb.AgentInfo(
            agent_id=self.agent_id,
            fingerprint=self.fingerprint,
            endpoint=self.endpoint,
            connected_at=self.connected_at,
            session_count=len(self.sessions),
        )


class AgentRegistry:
    def __init__(self) -> None:
        self._agents: dict[tuple[str, str], AgentConnection] = {}
        self._order_ids = itertools.count(1)

    def register(self, tenant: str, hello: pb.AgentHello) -> AgentConnection:
        if not hello.agent_id or len(hello.agent_id) > 128:
            raise InvalidArgument("agent_id must be 1-128 characters", field="hello.agent_id")
        if not hello.HasField("fingerprint"):
            raise InvalidArgument("hello.fingerprint is required", field="hello.fingerprint")
        key = (tenant, hello.agent_id)
        old = self._agents.get(key)
        if old is not None:
            silent = time.monotonic() - old.heard_at
            if silent < SILENT_AFTER_S:
                log.warning(
                    "agent_id_in_use",
                    agent_id=hello.agent_id,
                    holder=old.endpoint,
                    refused=hello.endpoint,
                )
                raise AlreadyExists(
                    f"agent id {hello.agent_id!r} is in use by the agent at "
                    f"{old.endpoint or 'an unnamed endpoint'} (connected since "
                    f"{old.connected_at.ToJsonString()}, heard from {silent:.0f} s ago); give "
                    "this agent another --agent-id, or stop the other one",
                    reason="AGENT_ID_IN_USE",
                    field="hello.agent_id",
                    metadata={"agent_id": hello.agent_id, "holder_endpoint": old.endpoint},
                )
            log.warning(
                "agent_taken_over",
                agent_id=hello.agent_id,
                silent_s=round(silent),
                old=old.endpoint,
                new=hello.endpoint,
            )
            self._fail_pending(old, f"agent {hello.agent_id!r} went silent and was replaced")
            old.ended.set()
        conn = AgentConnection(
            tenant=tenant,
            agent_id=hello.agent_id,
            fingerprint=hello.fingerprint,
            endpoint=hello.endpoint,
            connected_at=now_timestamp(),
        )
        self._agents[key] = conn
        log.info("agent_connected", agent_id=hello.agent_id, tenant=tenant, endpoint=hello.endpoint)
        return conn

    def unregister(self, conn: AgentConnection) -> None:
        key = (conn.tenant, conn.agent_id)
        if self._agents.get(key) is conn:
            del self._agents[key]
            log.info("agent_disconnected", agent_id=conn.agent_id)
        self._fail_pending(conn, f"agent {conn.agent_id!r} disconnected")

    def _fail_pending(self, conn: AgentConnection, why: str) -> None:
        for future in conn.pending.values():
            if not future.done():
                future.set_exception(Unavailable(f"{why} before answering; try again"))
        conn.pending.clear()

    def heard(self, conn: AgentConnection) -> None:
        conn.heard_at = time.monotonic()

    def report_sessions(self, conn: AgentConnection, report: pb.SessionReport) -> None:
        conn.sessions = {}
        for session in report.sessions:
            copy = pb.SessionInfo()
            copy.CopyFrom(session)
            copy.agent_id = conn.agent_id
            conn.sessions[session.session_id] = copy

    def resolve(self, conn: AgentConnection, result: pb.OrderResult) -> None:
        future = conn.pending.pop(result.order_id, None)
        if future is not None and not future.done():
            future.set_result(result)

    # -- queries ------------------------------------------------------------------------

    def count(self) -> int:
        """Connected agents of every tenant (for metrics)."""
        return len(self._agents)

    def agents(self, tenant: str) -> list[AgentConnection]:
        """The tenant's connected agents, by id."""
        return [self._agents[k] for k in sorted(self._agents) if k[0] == tenant]

    def _agent(self, tenant: str, agent_id: str) -> AgentConnection:
        conn = self._agents.get((tenant, agent_id))
        if conn is None:
            raise NotFound(f"no connected agent {agent_id!r}; `cwm agents` lists them")
        return conn

    def sessions(self, tenant: str, agent_id: str = "") -> list[pb.SessionInfo]:
        if agent_id:
            self._agent(tenant, agent_id)
        return [
            conn.sessions[sid]
            for conn in self.agents(tenant)
            if not agent_id or conn.agent_id == agent_id
            for sid in sorted(conn.sessions)
        ]

    def agent_with_session(
        self, tenant: str, session_id: str, agent_id: str = ""
    ) -> AgentConnection:
        hosts = [
            c
            for c in self.agents(tenant)
            if session_id in c.sessions and (not agent_id or c.agent_id == agent_id)
        ]
        if not hosts:
            where = f"on agent {agent_id!r}" if agent_id else "on any connected agent"
            raise NotFound(
                f"no live session {session_id!r} {where}; `cwm sessions` lists them",
                reason="SESSION_NOT_FOUND",
            )
        if len(hosts) > 1:
            raise FailedPrecondition(
                f"session {session_id!r} lives on several agents "
                f"({', '.join(c.agent_id for c in hosts)}); name one with agent_id",
                field="agent_id",
            )
        return hosts[0]

    def agent_for_window(
        self, tenant: str, window: pb.WindowInfo, agent_id: str = ""
    ) -> AgentConnection:
        """The tenant's named agent if its engine can use the window, else its least busy
        matching one."""
        agents = self.agents(tenant)
        if agent_id:
            conn = self._agent(tenant, agent_id)
            diffs = fingerprint_differences(window.fingerprint, conn.fingerprint)
            if diffs:
                raise FailedPrecondition(
                    f"agent {agent_id!r} cannot load window {window.name!r}: its engine's "
                    f"fingerprint differs ({'; '.join(diffs)})",
                    reason="FINGERPRINT_MISMATCH",
                )
            return conn
        if not agents:
            raise FailedPrecondition(
                f"no agent is connected to thaw window {window.name!r} into; start one with "
                "`cwm agent`",
                reason="NO_AGENT",
            )
        diffs = {
            c.agent_id: fingerprint_differences(window.fingerprint, c.fingerprint) for c in agents
        }
        matching = [c for c in agents if not diffs[c.agent_id]]
        if not matching:
            details = "; ".join(f"{agent}: {', '.join(d)}" for agent, d in diffs.items())
            raise FailedPrecondition(
                f"no connected agent's engine matches window {window.name!r} "
                f"(model {window.fingerprint.model_id!r}): {details}",
                reason="FINGERPRINT_MISMATCH",
            )
        return min(matching, key=lambda c: len(c.sessions))

    # -- orders -------------------------------------------------------------------------

    async def order(
        self, conn: AgentConnection, order: pb.Order, timeout: float = ORDER_TIMEOUT_S
    ) -> pb.OrderResult:
        """Send `order` to the agent and wait for its result; agent errors are re-raised."""
        order.order_id = f"o{next(self._order_ids)}"
        future: asyncio.Future[pb.OrderResult] = asyncio.get_running_loop().create_future()
        conn.pending[order.order_id] = future
        await conn.outbox.put(order)
        try:
            async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancel
                result = await future
        except TimeoutError:
            conn.pending.pop(order.order_id, None)
            raise DeadlineExceeded(
                f"agent {conn.agent_id!r} did not answer within {timeout:.0f} s"
            ) from None
        if result.WhichOneof("outcome") == "error":
            raise _order_error(result.error)
        return result


def _order_error(error: pb.OrderError) -> CwmError:
    code = _CODES.get(error.code, grpc.StatusCode.UNKNOWN)
    exc = error_class(code)(error.message, reason=error.reason, field=error.field)
    if type(exc) is CwmError:
        exc.code = code
    return exc
