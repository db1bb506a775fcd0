"""The host agent: beside an engine, dialled into the manager, carrying out its orders.

It keeps one SessionService.Connect stream open (reconnecting with exponential backoff when
the manager goes away), reports the engine's live sessions whenever they change, executes
freeze and thaw orders by moving chunks over the WindowService streams (never over the
control stream), and runs the auto-freeze policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import structlog

from cwm_client import AsyncWindowClient, chunks_from_bytes, pb
from cwm_client.channels import CHANNEL_OPTIONS, Credentials
from cwm_client.errors import (
    AlreadyExists,
    CwmError,
    FailedPrecondition,
    InvalidArgument,
    from_rpc_error,
)
from cwm_client.fingerprints import fingerprint_differences
from cwm_server.agent.auto_freeze import AutoFreezePolicy, auto_window_name
from cwm_server.agent.engines.base import EngineAdapter

HEARTBEAT_S = 10.0
"""Longest time between two reports to the manager, sessions changed or not."""
ID_CONFLICTS = ("AGENT_ID_IN_USE", "AGENT_REPLACED")
"""Why the manager ends or refuses a Connect over this agent's id."""
log = structlog.get_logger("cwm.agent")

SESSION_ID_RE = re.compile(r"\A[^\x00-\x1f\x7f]{1,256}\Z")
"""A new session's id (its cache_salt): what an engine takes as a salt (1-256 characters),
without control characters, so a session frozen under any salt can be thawed under it."""
_STOP = object()


class HostAgent:
    def __init__(
        self,
        engine: EngineAdapter,
        manager_target: str,
        agent_id: str,
        *,
        chunk_tokens: int | None = None,
        policy: AutoFreezePolicy | None = None,
        report_interval: float = 0.25,
        backoff: tuple[float, float] = (0.2, 5.0),
        credentials: Credentials | None = None,
    ) -> None:
        self.engine = engine
        self.manager_target = manager_target
        self.agent_id = agent_id
        self.chunk_tokens = chunk_tokens or engine.default_chunk_tokens()
        """Tokens per chunk of a freeze: given, or what suits the engine's KV size."""
        self.policy = policy or AutoFreezePolicy()
        self.report_interval = report_interval
        self.backoff = backoff
        self.credentials = credentials or Credentials()
        """The agent authenticates like any client (token, TLS); it acts as the token's
        tenant, and its sessions are visible to that tenant only."""
        self.connected = asyncio.Event()
        self.connections = 0
        self._frozen_tokens: dict[str, int] = {}
        self._last_window: dict[str, str] = {}
        self._session_locks: dict[str, asyncio.Lock] = {}
        self._windows: AsyncWindowClient | None = None

    # -- lifecycle --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set."""
        self._windows = AsyncWindowClient(self.manager_target, credentials=self.credentials)
        tasks = [asyncio.ensure_future(self._connection_loop(stop))]
        if self.policy.enabled:
            tasks.append(asyncio.ensure_future(self._auto_freeze_loop(stop)))
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._windows.close()

    async def _connection_loop(self, stop: asyncio.Event) -> None:
        """Stay connected; after a failure wait, doubling from the floor up to the ceiling.

        A connection that got as far as the manager's welcome resets the wait to the floor,
        so an agent finds a restarted manager within a fraction of a second.
        """
        floor, ceiling = self.backoff
        delay = floor
        while not stop.is_set():
            before = self.connections
            try:
                await self._connected(stop)
            except (grpc.RpcError, CwmError, OSError) as exc:
                error = from_rpc_error(exc) if isinstance(exc, grpc.RpcError) else exc
                if isinstance(error, CwmError) and error.reason in ID_CONFLICTS:
                    # Another agent holds this id (or took it over): say so, and keep
                    # trying, since the other one may stop.
                    log.error("agent_id_conflict", error=str(error), retry_in=round(delay, 2))
                else:
                    log.warning("manager_unreachable", error=str(error), retry_in=round(delay, 2))
            finally:
                self.connected.clear()
            if self.connections > before:
                delay = floor
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):  # not wait_for: it can swallow a cancel
                    await stop.wait()
            delay = min(delay * 2, ceiling)

    async def _connected(self, stop: asyncio.Event) -> None:
        """One Connect stream, from hello until the manager or the network ends it."""
        async with self.credentials.aio_channel(self.manager_target, CHANNEL_OPTIONS) as ch:
            outbox: asyncio.Queue[Any] = asyncio.Queue()
            await outbox.put(
                pb.ConnectRequest(
                    hello=pb.AgentHello(
                        agent_id=self.agent_id,
                        fingerprint=self.engine.fingerprint,
                        endpoint=self.engine.endpoint,
                    )
                )
            )

            async def requests() -> AsyncIterator[pb.ConnectRequest]:
                while (message := await outbox.get()) is not _STOP:
                    yield message

            call = pb.SessionServiceStub(ch).Connect(
                requests(), metadata=self.credentials.metadata()
            )
            first = await call.read()
            if first is grpc.aio.EOF or first.WhichOneof("payload") != "welcome":  # type: ignore[attr-defined]
                raise FailedPrecondition("the manager did not welcome this agent")
            self.connections += 1
            self.connected.set()
            log.info("connected", manager=self.manager_target, manager_id=first.welcome.manager_id)
            reporter = asyncio.ensure_future(self._report_loop(outbox))
            running: set[asyncio.Future[None]] = set()
            try:
                while not stop.is_set():
                    message = await call.read()
                    if message is grpc.aio.EOF:  # type: ignore[attr-defined]
                        break
                    if message.WhichOneof("payload") == "order":
                        task = asyncio.ensure_future(self._execute(message.order, outbox))
                        running.add(task)
                        task.add_done_callback(running.discard)
            finally:
                reporter.cancel()
                for task in running:
                    task.cancel()
                await asyncio.gather(reporter, *running, return_exceptions=True)
                await outbox.put(_STOP)
                call.cancel()

    async def _report_loop(self, outbox: asyncio.Queue[Any]) -> None:
        """Report the sessions when they change, and at least every `HEARTBEAT_S` (the
        manager lets another connection take over an agent id only once its holder has
        been silent for longer: `cwm_server.manager.agents.SILENT_AFTER_S`)."""
        last: list[tuple[str, int]] | None = None
        sent_at = 0.0
        while True:
            sessions = await asyncio.to_thread(self.engine.sessions)
            snapshot = sorted((s.session_id, s.token_count) for s in sessions)
            if snapshot != last or time.monotonic() - sent_at >= HEARTBEAT_S:
                await outbox.put(pb.ConnectRequest(sessions=self._report(sessions)))
                last = snapshot
                sent_at = time.monotonic()
            await asyncio.sleep(self.report_interval)

    def _request_fields(self, session_id: str) -> str:
        return json.dumps(self.engine.request_fields(session_id), separators=(",", ":"))

    def _report(self, sessions: list[Any]) -> pb.SessionReport:
        report = pb.SessionReport()
        for session in sessions:
            info = report.sessions.add(
                session_id=session.session_id,
                agent_id=self.agent_id,
                cache_salt=session.cache_salt,
                token_count=session.token_count,
                last_window=self._last_window.get(session.session_id, ""),
                request_fields=self._request_fields(session.session_id),
            )
            info.last_active.FromNanoseconds(int(session.last_active * 1e9))
        return report

    # -- orders -----------------------------------------------------------------------

    async def _execute(self, order: pb.Order, outbox: asyncio.Queue[Any]) -> None:
        result = pb.OrderResult(order_id=order.order_id)
        try:
            kind = order.WhichOneof("kind")
            if kind == "freeze":
                f = order.freeze
                result.freeze.CopyFrom(
                    await self.freeze(
                        f.session_id,
                        f.window_name,
                        description=f.description,
                        tags=dict(f.tags),
                        ttl_seconds=f.ttl_seconds,
                        replace=f.replace,
                    )
                )
            elif kind == "thaw":
                result.thaw.CopyFrom(
                    await self.thaw(order.thaw.window_name, order.thaw.new_session_id)
                )
            else:
                raise InvalidArgument(f"this agent does not know order kind {kind!r}")
        except CwmError as exc:
            result.error.CopyFrom(
                pb.OrderError(
                    code=exc.code.value[0], message=exc.message, reason=exc.reason, field=exc.field
                )
            )
        except Exception as exc:
            log.exception("order_failed", order_id=order.order_id)
            result.error.CopyFrom(
                pb.OrderError(
                    code=grpc.StatusCode.INTERNAL.value[0],
                    message=f"agent {self.agent_id!r} failed: {type(exc).__name__}: {exc}",
                    reason="AGENT_ERROR",
                )
            )
        await outbox.put(pb.ConnectRequest(result=result))

    def _lock(self, session_id: str) -> asyncio.Lock:
        return self._session_locks.setdefault(session_id, asyncio.Lock())

    async def freeze(
        self,
        session_id: str,
        window_name: str,
        *,
        description: str = "",
        tags: dict[str, str] | None = None,
        ttl_seconds: int = 0,
        replace: bool = False,
    ) -> pb.FreezeOrderResult:
        """Export the session's KV and freeze it; only chunks the store lacks are sent
        (`replace`: a window of that name is replaced, atomically)."""
        assert self._windows is not None
        async with self._lock(session_id):
            exported = await asyncio.to_thread(
                self.engine.export_session, session_id, self.chunk_tokens
            )
            chunks = await asyncio.to_thread(
                chunks_from_bytes,
                exported.chunks,
                self.chunk_tokens,
                len(exported.token_ids),
                exported.digests or None,
            )
            started = time.perf_counter()
            result = await self._windows.freeze(
                window_name,
                chunks,
                fingerprint=self.engine.fingerprint,
                token_ids=exported.token_ids,
                chunk_tokens=self.chunk_tokens,
                session_id=session_id,
                cache_salt=session_id,
                parent=self._last_window.get(session_id, ""),
                tags=tags,
                description=description,
                ttl_seconds=ttl_seconds,
                replace=replace,
            )
            self._frozen_tokens[session_id] = len(exported.token_ids)
            self._last_window[session_id] = window_name
        log.info(
            "frozen",
            session_id=session_id,
            window=window_name,
            tokens=len(exported.token_ids),
            sent=result.chunks_sent,
            reused=result.chunks_reused,
            seconds=round(time.perf_counter() - started, 3),
        )
        return pb.FreezeOrderResult(
            window=result.window,
            chunks_sent=result.chunks_sent,
            chunks_reused=result.chunks_reused,
            bytes_sent=result.bytes_sent,
        )

    async def thaw(self, window_name: str, new_session_id: str = "") -> pb.ThawOrderResult:
        """Pull a window (verified chunk by chunk) and load it into a new engine session."""
        assert self._windows is not None
        # A new session's id is its cache_salt: 256 random bits, shown only to the tenant
        # (or, where sessions are fixed places such as llama-server's slots, a free one).
        session_id = new_session_id or await asyncio.to_thread(self.engine.new_session_id)
        if not SESSION_ID_RE.match(session_id):
            raise InvalidArgument(
                f"session id {session_id[:40]!r} must be 1-256 characters, none of them a "
                "control character",
                field="new_session_id",
            )
        async with self._lock(session_id):
            existing = await asyncio.to_thread(self.engine.sessions)
            if any(s.session_id == session_id for s in existing):
                raise AlreadyExists(
                    f"agent {self.agent_id!r} already has a session {session_id!r}",
                    field="new_session_id",
                )
            stream = await self._windows.thaw(window_name)
            async with stream:
                window = stream.window
                diffs = fingerprint_differences(window.fingerprint, self.engine.fingerprint)
                if diffs:
                    raise FailedPrecondition(
                        f"window {window_name!r} was made by another model or engine: "
                        + "; ".join(diffs),
                        reason="FINGERPRINT_MISMATCH",
                    )
                # Each chunk goes to the engine as it arrives (vLLM stages it in shared
                # memory) while the next one is on the wire.
                sink = await asyncio.to_thread(
                    self.engine.begin_import,
                    session_id,
                    list(window.token_ids),
                    window.chunk_tokens,
                )
                chunks = raw_bytes = 0
                try:
                    async for chunk in stream:
                        await asyncio.to_thread(sink.add_chunk, chunks, chunk.data, chunk.digest)
                        chunks += 1
                        raw_bytes += len(chunk.data)
                except BaseException:
                    await asyncio.to_thread(sink.abort)
                    raise
            await asyncio.to_thread(sink.finish)
            self._frozen_tokens[session_id] = window.token_count
            self._last_window[session_id] = window_name
        log.info("thawed", window=window_name, session_id=session_id, tokens=window.token_count)
        session = pb.SessionInfo(
            session_id=session_id,
            agent_id=self.agent_id,
            cache_salt=session_id,
            token_count=window.token_count,
            last_window=window_name,
            request_fields=self._request_fields(session_id),
        )
        session.last_active.GetCurrentTime()
        return pb.ThawOrderResult(session=session, chunks=chunks, raw_bytes=raw_bytes)

    # -- auto-freeze ------------------------------------------------------------------

    async def _auto_freeze_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self.report_interval)
            if not self.connected.is_set():
                continue
            sessions = await asyncio.to_thread(self.engine.sessions)
            now = time.time()
            for session in sessions:
                reason = self.policy.due(
                    session, self._frozen_tokens.get(session.session_id, 0), now
                )
                if reason is None or self._lock(session.session_id).locked():
                    continue
                name = auto_window_name(session.session_id, now)
                try:
                    await self.freeze(
                        session.session_id,
                        name,
                        description=f"auto-freeze: {reason}",
                        tags={"cwm.auto": "true"},
                    )
                except CwmError as exc:
                    log.warning("auto_freeze_failed", session_id=session.session_id, error=str(exc))
