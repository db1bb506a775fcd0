"""The RPC interceptor on its own: a real grpc.aio server on 127.0.0.1:0 with
`RpcInterceptor` in front of a small real WindowService servicer that answers with what the
call saw (its log context, its tenant), so each concern is checked where it shows: the
request id echoed and bound, a caller refused before its bytes are parsed, bad bytes as
INVALID_ARGUMENT, exceptions as statuses with ErrorInfo, and the metrics of every call."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import grpc.aio
import pytest
import structlog
from prometheus_client import CollectorRegistry

from cwm_client import pb
from cwm_client.errors import CwmError, NotFound, from_rpc_error
from cwm_server.manager.metrics import RpcMetrics
from cwm_server.manager.rpc.auth import Authenticator, TokenEntry
from cwm_server.manager.rpc.interceptors.interceptor import RpcInterceptor
from cwm_server.manager.rpc.tenancy import current_tenant
from cwm_server.manager.windows.wire import thaw_parts

TOKEN = "cwm_interceptor-test-token"
GET = "/cwm.v1.WindowService/GetWindow"
THAW = "/cwm.v1.WindowService/Thaw"
CHUNK = os.urandom(5000)
PART_BYTES = 2048


class ProbeServicer(pb.WindowServiceServicer):
    """GetWindow answers with the call's log context and tenant; the name picks a failure.
    Thaw sends a window and one chunk as pre-encoded parts, or (name "hang") waits."""

    def __init__(self) -> None:
        self.calls = 0
        self.hanging = asyncio.Event()

    async def GetWindow(  # noqa: N802 - gRPC method name
        self, request: pb.GetWindowRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetWindowResponse:
        self.calls += 1
        if request.name == "missing":
            raise NotFound("no window 'missing'", reason="WINDOW_NOT_FOUND", field="name")
        if request.name == "bug":
            raise RuntimeError("a bug in the servicer")
        bound = structlog.contextvars.get_contextvars()
        return pb.GetWindowResponse(
            window=pb.WindowInfo(
                name=request.name,
                tenant=current_tenant(context),
                tags={key: str(value) for key, value in bound.items()},
            )
        )

    async def Thaw(  # noqa: N802
        self, request: pb.ThawRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[object]:
        self.calls += 1
        yield pb.ThawResponse(window=pb.WindowInfo(name=request.name))
        if request.name == "hang":
            self.hanging.set()
            await asyncio.Event().wait()
        meta = pb.ChunkRef(
            index=0, token_start=0, token_count=16, digest=b"d" * 32, raw_size=len(CHUNK)
        )
        for part in thaw_parts(meta, CHUNK, pb.ChunkCodec.CHUNK_CODEC_RAW, PART_BYTES):
            yield part


@dataclass
class Served:
    channel: grpc.aio.Channel
    stub: pb.WindowServiceStub
    servicer: ProbeServicer
    registry: CollectorRegistry

    def sample(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def raw(self, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
        """A unary method that sends the bytes it is given as they are."""
        return self.channel.unary_unary(method)


async def _serve(auth: Authenticator | None) -> AsyncIterator[Served]:
    registry = CollectorRegistry()
    servicer = ProbeServicer()
    server = grpc.aio.server(interceptors=[RpcInterceptor(RpcMetrics(registry), auth)])
    pb.add_WindowServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Served(channel, pb.WindowServiceStub(channel), servicer, registry)
    finally:
        await server.stop(None)


@pytest.fixture
async def open_server() -> AsyncIterator[Served]:
    async for served in _serve(None):
        yield served


@pytest.fixture
async def guarded_server() -> AsyncIterator[Served]:
    entry = TokenEntry(hashlib.sha256(TOKEN.encode()).digest(), "acme", "reader")
    async for served in _serve(Authenticator([entry])):
        yield served


async def _failure(call: grpc.aio.Call) -> tuple[CwmError, dict[str, str]]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    trailing = {k: v for k, v in caught.value.trailing_metadata() or () if isinstance(v, str)}
    return from_rpc_error(caught.value), trailing


async def test_request_id_is_echoed_and_bound_into_the_call_log_context(
    open_server: Served,
) -> None:
    call = open_server.stub.GetWindow(
        pb.GetWindowRequest(name="w"), metadata=[("x-request-id", "req-42")]
    )
    response = await call
    assert dict(await call.trailing_metadata())["x-request-id"] == "req-42"
    assert response.window.tags["request_id"] == "req-42"
    assert response.window.tags["method"] == GET
    assert response.window.tenant == "default"  # auth off: every call is the default tenant


async def test_unusable_request_id_is_replaced_by_a_generated_one(open_server: Served) -> None:
    call = open_server.stub.GetWindow(
        pb.GetWindowRequest(name="w"), metadata=[("x-request-id", "has a space")]
    )
    response = await call
    echoed = dict(await call.trailing_metadata())["x-request-id"]
    assert echoed != "has a space" and len(echoed) == 32
    assert response.window.tags["request_id"] == echoed


async def test_caller_without_credentials_is_refused_before_its_bytes_are_parsed(
    guarded_server: Served,
) -> None:
    error, trailing = await _failure(guarded_server.raw(GET)(b"\xff\xff\xff"))
    assert error.code is grpc.StatusCode.UNAUTHENTICATED
    assert error.reason == "NO_CREDENTIALS"
    assert trailing["x-request-id"]
    assert guarded_server.servicer.calls == 0


async def test_authenticated_caller_runs_as_its_tenant_and_role_limits_it(
    guarded_server: Served,
) -> None:
    token = [("authorization", f"Bearer {TOKEN}")]
    response = await guarded_server.stub.GetWindow(pb.GetWindowRequest(name="w"), metadata=token)
    assert response.window.tenant == "acme"
    assert response.window.tags["tenant"] == "acme" and response.window.tags["role"] == "reader"
    delete = guarded_server.stub.DeleteWindow(pb.DeleteWindowRequest(name="w"), metadata=token)
    error, _ = await _failure(delete)
    assert error.code is grpc.StatusCode.PERMISSION_DENIED
    assert error.reason == "ROLE_FORBIDS_METHOD"
    assert guarded_server.servicer.calls == 1


async def test_bytes_that_are_no_message_are_invalid_argument(guarded_server: Served) -> None:
    token = [("authorization", f"Bearer {TOKEN}")]
    error, trailing = await _failure(guarded_server.raw(GET)(b"\xff\xff\xff", metadata=token))
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "MALFORMED_REQUEST"
    assert "GetWindow" in error.message
    assert trailing["x-request-id"]
    assert guarded_server.servicer.calls == 0


async def test_cwm_error_becomes_its_status_with_error_info_and_bad_request(
    open_server: Served,
) -> None:
    call = open_server.stub.GetWindow(
        pb.GetWindowRequest(name="missing"), metadata=[("x-request-id", "nf-1")]
    )
    error, trailing = await _failure(call)
    assert error.code is grpc.StatusCode.NOT_FOUND
    assert error.reason == "WINDOW_NOT_FOUND"
    assert error.field == "name"
    assert error.message == "no window 'missing'"
    assert trailing["x-request-id"] == "nf-1"


async def test_unexpected_exception_is_internal_naming_the_request_id(
    open_server: Served,
) -> None:
    call = open_server.stub.GetWindow(
        pb.GetWindowRequest(name="bug"), metadata=[("x-request-id", "bug-7")]
    )
    error, _ = await _failure(call)
    assert error.code is grpc.StatusCode.INTERNAL
    assert "bug-7" in error.message and "GetWindow" in error.message
    assert "a bug in the servicer" not in error.message  # details stay in the manager's log


async def test_unknown_method_is_unimplemented_with_error_info(open_server: Served) -> None:
    error, _ = await _failure(open_server.raw("/cwm.v1.WindowService/NoSuchMethod")(b""))
    assert error.code is grpc.StatusCode.UNIMPLEMENTED
    assert error.reason == "METHOD_NOT_FOUND"
    assert error.metadata["method"] == "/cwm.v1.WindowService/NoSuchMethod"


async def test_unary_calls_are_counted_by_method_and_code(open_server: Served) -> None:
    request = pb.GetWindowRequest(name="w")
    await open_server.stub.GetWindow(request)
    await _failure(open_server.stub.GetWindow(pb.GetWindowRequest(name="missing")))
    label = GET.lstrip("/")
    assert open_server.sample("cwm_rpc_duration_seconds_count", method=label, code="OK") == 1
    assert open_server.sample("cwm_rpc_duration_seconds_count", method=label, code="NOT_FOUND") == 1
    assert open_server.sample("cwm_rpc_received_messages_total", method=label) == 2
    received = len(request.SerializeToString()) + len(
        pb.GetWindowRequest(name="missing").SerializeToString()
    )
    assert open_server.sample("cwm_rpc_received_message_bytes_total", method=label) == received
    assert open_server.sample("cwm_rpc_sent_messages_total", method=label) == 1


async def test_pre_encoded_thaw_parts_reach_the_client_and_are_counted(
    open_server: Served,
) -> None:
    responses = [r async for r in open_server.stub.Thaw(pb.ThawRequest(name="w"))]
    assert responses[0].window.name == "w"
    parts = [r.chunk for r in responses[1:]]
    assert len(parts) == 3  # 5000 bytes in parts of at most 2048
    assert b"".join(p.data for p in parts) == CHUNK
    assert [p.data_offset for p in parts] == [0, 2048, 4096]
    assert all(p.encoded_size == len(CHUNK) for p in parts)
    label = THAW.lstrip("/")
    wire = sum(len(r.SerializeToString()) for r in responses)
    assert open_server.sample("cwm_rpc_sent_messages_total", method=label) == 4
    assert open_server.sample("cwm_rpc_sent_message_bytes_total", method=label) == wire
    assert open_server.sample("cwm_rpc_sent_chunk_bytes_total", method=label) == len(CHUNK)
    assert open_server.sample("cwm_rpc_sent_chunks_total", method=label) == 1
    assert open_server.sample("cwm_rpc_duration_seconds_count", method=label, code="OK") == 1
    assert open_server.sample("cwm_streams_in_flight", method=label) == 0


async def test_stream_the_client_cancels_is_counted_cancelled_and_leaves_flight(
    open_server: Served,
) -> None:
    label = THAW.lstrip("/")
    stream = open_server.stub.Thaw(pb.ThawRequest(name="hang"))
    first = await stream.read()
    assert first.window.name == "hang"
    await asyncio.wait_for(open_server.servicer.hanging.wait(), 10)
    assert open_server.sample("cwm_streams_in_flight", method=label) == 1
    stream.cancel()
    for _ in range(200):
        if open_server.sample("cwm_rpc_duration_seconds_count", method=label, code="CANCELLED"):
            break
        await asyncio.sleep(0.025)
    assert open_server.sample("cwm_rpc_duration_seconds_count", method=label, code="CANCELLED") == 1
    assert open_server.sample("cwm_streams_in_flight", method=label) == 0
