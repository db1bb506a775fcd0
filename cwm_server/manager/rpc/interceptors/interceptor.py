"""The manager's one gRPC interceptor: every call, in every shape, runs through the
concerns of this package in their fixed order (see the package docstring for the order and
for why this is one interceptor rather than a stack of them)."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from cwm_client.errors import CwmError, Unimplemented
from cwm_server.manager.metrics import CallMetrics, RpcMetrics
from cwm_server.manager.rpc.auth import Authenticator
from cwm_server.manager.rpc.interceptors.authentication import as_caller, identify
from cwm_server.manager.rpc.interceptors.call import Call
from cwm_server.manager.rpc.interceptors.error_mapping import MappedErrors, abort
from cwm_server.manager.rpc.interceptors.metrics import Recorded, recorder_for
from cwm_server.manager.rpc.interceptors.request_context import (
    in_request_context,
    request_id_from,
)
from cwm_server.manager.rpc.interceptors.serialization import (
    parse_one,
    parse_stream,
    request_parser,
    response_serializer,
)

Prepare = Callable[[Any, CallMetrics | None], Any]
"""Turns what gRPC hands the handler (raw bytes, or an iterator of them) into what the
servicer method takes."""


def _start(
    method: str, context: grpc.aio.ServicerContext, metrics: CallMetrics | None, streaming: bool
) -> Call:
    return Call(method, context, request_id_from(context.invocation_metadata()), metrics, streaming)


class RpcInterceptor(grpc.aio.ServerInterceptor):
    """Request context, metrics, error mapping, authentication and request parsing for
    every RPC; `metrics` None keeps none, `auth` None runs every call as the default
    tenant's admin (`tenancy.ANONYMOUS`)."""

    def __init__(
        self, metrics: RpcMetrics | None = None, auth: Authenticator | None = None
    ) -> None:
        self._metrics = metrics
        self._auth = auth

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None:
            return self._unknown_method(method)
        metrics = recorder_for(self._metrics, method)
        parse = request_parser(method, handler.request_deserializer)
        serialize = response_serializer(handler.response_serializer, metrics)

        def one(raw: Any, recorder: CallMetrics | None) -> Any:
            return parse_one(raw, parse, recorder)

        def many(requests: Any, recorder: CallMetrics | None) -> Any:
            return parse_stream(requests, parse, recorder)

        # request_deserializer=None: gRPC hands the raw bytes over and `parse` maps a bad
        # message to INVALID_ARGUMENT inside the wrappers.
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary_response(method, metrics, handler.unary_unary, one, False),
                request_deserializer=None,
                response_serializer=serialize,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._unary_response(method, metrics, handler.stream_unary, many, True),
                request_deserializer=None,
                response_serializer=serialize,
            )
        # A streaming handler is an async generator, or a coroutine that writes with
        # `context.write` (grpcio's health Watch); each keeps its own shape.
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(method, metrics, handler.unary_stream, one),
                request_deserializer=None,
                response_serializer=serialize,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(method, metrics, handler.stream_stream, many),
                request_deserializer=None,
                response_serializer=serialize,
            )
        return handler

    def _unary_response(
        self,
        method: str,
        metrics: CallMetrics | None,
        behavior: Callable[..., Awaitable[Any]],
        prepare: Prepare,
        streaming: bool,
    ) -> Callable[..., Any]:
        auth = self._auth

        async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _start(method, context, metrics, streaming)
            with in_request_context(call), Recorded(call):
                async with MappedErrors(call):
                    with as_caller(auth, call):
                        return await behavior(prepare(request, metrics), context)

        return handler

    def _stream_response(
        self,
        method: str,
        metrics: CallMetrics | None,
        behavior: Callable[..., AsyncIterator[Any]],
        prepare: Prepare,
    ) -> Callable[..., AsyncIterator[Any]]:
        """The one wrapper around a response stream: per message, one step of this
        generator and nothing else."""
        auth = self._auth

        async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = _start(method, context, metrics, streaming=True)
            with in_request_context(call), Recorded(call):
                async with MappedErrors(call):
                    with as_caller(auth, call):
                        async for response in behavior(prepare(request, metrics), context):
                            yield response

        return handler

    def _streaming(
        self,
        method: str,
        metrics: CallMetrics | None,
        behavior: Callable[..., Any],
        prepare: Prepare,
    ) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behavior):
            return self._stream_response(method, metrics, behavior, prepare)
        return self._unary_response(method, metrics, behavior, prepare, streaming=True)

    def _unknown_method(self, method: str) -> grpc.RpcMethodHandler:
        """A method this server does not have: UNIMPLEMENTED with an ErrorInfo saying so
        (what gRPC answers on its own carries no details), or UNAUTHENTICATED to a peer
        that is no one. A stream-stream handler on raw bytes serves any call shape."""
        metrics, auth = self._metrics, self._auth

        async def handler(requests: Any, context: grpc.aio.ServicerContext) -> None:
            call = _start(method, context, recorder_for(metrics, method), streaming=False)
            with in_request_context(call), Recorded(call):
                try:
                    identify(auth, call)
                except CwmError as exc:
                    await abort(call, exc)
                await abort(
                    call,
                    Unimplemented(
                        f"this manager has no method {method}; it serves "
                        "cwm.v1.WindowService, cwm.v1.SessionService, grpc.health.v1.Health "
                        "and server reflection (an older manager than the client?)",
                        reason="METHOD_NOT_FOUND",
                        metadata={"method": method},
                    ),
                )

        return grpc.stream_stream_rpc_method_handler(handler)
