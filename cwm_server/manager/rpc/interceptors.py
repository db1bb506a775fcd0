"""Every RPC passes through here: request ids, log context, metrics, and error mapping.

- **Request ids.** A client may send ``x-request-id`` in its metadata (printable ASCII
  without spaces, at most 128 characters); otherwise the manager makes one. It is bound into
  structlog's context variables for the whole RPC, so every log line the call causes carries
  it, and it goes back to the client in the trailing metadata under the same key, with an
  error too.
- **Errors.** Servicer methods stay thin and raise `cwm_client.errors` classes; they are
  turned into the status code, message and ``google.rpc.Status`` details (ErrorInfo, and
  BadRequest when a field is known) a client can act on. Anything else is a bug: it is
  logged with its traceback and answered INTERNAL naming the request id, so a client's
  mistake can never surface as UNKNOWN.
- **Metrics** (`cwm_server.manager.metrics`): duration and status of every call, messages
  and bytes in and out, chunk bytes and chunks per method, streams in flight.
- **Authentication** (`cwm_server.manager.rpc.auth`, when an `Authenticator` is given): the
  caller is resolved from the metadata and TLS peer before the request is even parsed, so
  an unauthenticated peer learns nothing from its bytes, and set for the call
  (`tenancy.current_tenant`); its tenant is bound into the log context. Health checks and
  reflection stay open.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import grpc
import grpc.aio
import structlog
from google.protobuf.message import DecodeError
from grpc_status import rpc_status

from cwm_client.errors import CwmError, Internal, InvalidArgument, Unimplemented
from cwm_server.manager.metrics import CallMetrics, RpcMetrics, method_label
from cwm_server.manager.rpc.auth import Authenticator, authorize, is_open
from cwm_server.manager.rpc.tenancy import reset_caller, set_caller
from cwm_server.manager.windows.wire import PreEncoded

log = structlog.get_logger("cwm.rpc")

REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
_QUIET_PREFIXES = ("/grpc.",)
"""Health checks and reflection are logged at debug level only (probes are frequent)."""


def request_id_from(metadata: Sequence[tuple[str, Any]] | None) -> str:
    """The client's x-request-id if it is usable, else a new one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


@contextmanager
def _bound(**values: str) -> Iterator[None]:
    tokens = structlog.contextvars.bind_contextvars(**values)
    try:
        yield
    finally:
        # ValueError: finished in another context (a generator closed by its finaliser).
        with suppress(ValueError):
            structlog.contextvars.reset_contextvars(**tokens)


class _Call:
    """One RPC as it runs: its id, timing, metrics, and how it ended."""

    def __init__(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        metrics: RpcMetrics | None,
        streaming: bool,
        auth: Authenticator | None = None,
    ) -> None:
        self.method = method
        self.auth = auth
        self.tenant = ""
        """The authenticated caller's tenant ("" when auth is off or the call is open)."""
        self.context = context
        self.request_id = request_id_from(context.invocation_metadata())
        self.started = time.perf_counter()
        self.metrics = CallMetrics(metrics, method_label(method)) if metrics else None
        self.streaming = streaming
        self.code = grpc.StatusCode.OK
        context.set_trailing_metadata(((REQUEST_ID_KEY, self.request_id),))
        if self.metrics is not None and streaming:
            self.metrics.stream_opened()

    async def abort(self, error: CwmError) -> None:
        self.code = error.code
        status = rpc_status.to_status(error.to_status())
        trailing = (*status.trailing_metadata, (REQUEST_ID_KEY, self.request_id))
        await self.context.abort(status.code, status.details, trailing)

    def internal(self, exc: BaseException) -> Internal:
        log.error("internal_error", exc_info=exc)
        return Internal(
            f"internal error in {self.method} (request id {self.request_id}); the manager's "
            "log has details"
        )

    def aborted(self) -> None:
        code = None
        try:
            code = self.context.code()
        except Exception:  # noqa: BLE001 - older grpc: no code() on the aio context
            code = None
        self.code = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN

    def finish(self) -> None:
        seconds = time.perf_counter() - self.started
        if self.metrics is not None:
            if self.streaming:
                self.metrics.stream_closed()
            self.metrics.finished(self.code.name, seconds)
        quiet = self.method.startswith(_QUIET_PREFIXES) and self.code is grpc.StatusCode.OK
        extra = {"tenant": self.tenant} if self.tenant else {}
        (log.debug if quiet else log.info)(
            "rpc", code=self.code.name, duration_ms=round(seconds * 1000, 3), **extra
        )

    @contextmanager
    def running(self) -> Iterator[None]:
        with _bound(request_id=self.request_id, method=self.method):
            try:
                yield
            finally:
                self.finish()

    @contextmanager
    def authenticated(self) -> Iterator[None]:
        """Resolve the caller (raising Unauthenticated or PermissionDenied) and make it the
        call's caller until the block ends."""
        if self.auth is None or is_open(self.method):
            yield
            return
        caller = self.auth.identify(self.context)
        self.tenant = caller.tenant
        authorize(caller, self.method)
        token = set_caller(caller)
        try:
            with _bound(tenant=caller.tenant, role=caller.role):
                yield
        finally:
            reset_caller(token)

    def received(self, raw: Any, message: Any) -> None:
        if self.metrics is not None:
            self.metrics.received(len(raw) if isinstance(raw, bytes) else 0, message, raw)


Parse = Callable[[Any], Any]


def _parser(method: str, deserialize: Callable[[bytes], Any] | None) -> Parse:
    """Parse request bytes here rather than in gRPC, so that bytes that are not a valid
    message (corrupt wire format, a string field with bad UTF-8) are the client's
    INVALID_ARGUMENT; parsed by gRPC they surfaced as UNKNOWN (unary) or INTERNAL (Freeze)."""
    if deserialize is None:
        return lambda raw: raw

    def parse(raw: Any) -> Any:
        try:
            return deserialize(raw)
        except DecodeError as exc:
            raise InvalidArgument(
                f"the request to {method} is not a valid message ({exc})",
                reason="MALFORMED_REQUEST",
            ) from None

    return parse


async def _parse_stream(
    requests: AsyncIterator[Any], parse: Parse, call: _Call
) -> AsyncIterator[Any]:
    async for raw in requests:
        message = parse(raw)
        call.received(raw, message)
        yield message


def _parse_one(raw: Any, parse: Parse, call: _Call) -> Any:
    message = parse(raw)
    call.received(raw, message)
    return message


def _counting(
    serialize: Callable[[Any], bytes] | None, metrics: RpcMetrics | None, method: str
) -> Callable[[Any], bytes] | None:
    """The response serializer, counting each response as it is serialized: its size is
    then the length of the bytes at hand, where sizing the message separately
    (`ByteSize()`, and reading `chunk.data`) cost as much as serializing it again. A
    response already in wire format (wire.PreEncoded, Thaw's chunk parts) goes out as it
    is."""
    if serialize is None:
        return serialize
    call_metrics = CallMetrics(metrics, method_label(method)) if metrics is not None else None
    inner = serialize

    def counted(message: Any) -> bytes:
        if type(message) is PreEncoded:
            if call_metrics is not None:
                call_metrics.sent_encoded(
                    len(message.wire), message.chunk_bytes, message.first_part
                )
            return message.wire
        data = inner(message)
        if call_metrics is not None:
            call_metrics.sent(message, data)
        return data

    return counted


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Request ids, log context, metrics and error mapping for every RPC (see above)."""

    def __init__(
        self, metrics: RpcMetrics | None = None, auth: Authenticator | None = None
    ) -> None:
        self._metrics = metrics
        self._auth = auth

    def _unary_response(
        self,
        method: str,
        behavior: Callable[..., Awaitable[Any]],
        prepare: Callable[[Any, _Call], Any],
        streaming: bool,
    ) -> Callable[..., Any]:
        metrics, auth = self._metrics, self._auth

        async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(method, context, metrics, streaming, auth)
            with call.running():
                try:
                    with call.authenticated():
                        response = await behavior(prepare(request, call), context)
                    return response
                except CwmError as exc:
                    await call.abort(exc)
                except grpc.aio.AbortError:
                    call.aborted()
                    raise
                except asyncio.CancelledError:
                    call.code = grpc.StatusCode.CANCELLED
                    raise
                except Exception as exc:  # noqa: BLE001 - the one place unexpected errors land
                    await call.abort(call.internal(exc))

        return handler

    def _stream_response(
        self,
        method: str,
        behavior: Callable[..., Any],
        prepare: Callable[[Any, _Call], Any],
    ) -> Callable[..., Any]:
        metrics, auth = self._metrics, self._auth

        async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = _Call(method, context, metrics, streaming=True, auth=auth)
            with call.running():
                try:
                    with call.authenticated():
                        async for response in behavior(prepare(request, call), context):
                            yield response
                except CwmError as exc:
                    await call.abort(exc)
                except grpc.aio.AbortError:
                    call.aborted()
                    raise
                except (asyncio.CancelledError, GeneratorExit):
                    call.code = grpc.StatusCode.CANCELLED
                    raise
                except Exception as exc:  # noqa: BLE001
                    await call.abort(call.internal(exc))

        return handler

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None:
            return self._unknown_method(method)
        parse = _parser(method, handler.request_deserializer)
        serialize = _counting(handler.response_serializer, self._metrics, method)

        def one(raw: Any, call: _Call) -> Any:
            return _parse_one(raw, parse, call)

        def many(requests: Any, call: _Call) -> Any:
            return _parse_stream(requests, parse, call)

        # request_deserializer=None: gRPC hands the raw bytes over and `parse` maps a bad
        # message to INVALID_ARGUMENT inside the wrappers.
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary_response(method, handler.unary_unary, one, streaming=False),
                request_deserializer=None,
                response_serializer=serialize,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._unary_response(method, handler.stream_unary, many, streaming=True),
                request_deserializer=None,
                response_serializer=serialize,
            )
        # A streaming handler is an async generator, or a coroutine that writes with
        # `context.write` (grpcio's health Watch); each keeps its own shape.
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(method, handler.unary_stream, one),
                request_deserializer=None,
                response_serializer=serialize,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(method, handler.stream_stream, many),
                request_deserializer=None,
                response_serializer=serialize,
            )
        return handler

    def _unknown_method(self, method: str) -> grpc.RpcMethodHandler:
        """A method this server does not have: UNIMPLEMENTED with an ErrorInfo saying so
        (what gRPC answers on its own carries no details). A stream-stream handler on raw
        bytes serves any call shape."""
        metrics, auth = self._metrics, self._auth

        async def handler(requests: Any, context: grpc.aio.ServicerContext) -> None:
            call = _Call(method, context, metrics, streaming=False, auth=auth)
            with call.running():
                if auth is not None and not is_open(method):
                    try:
                        auth.identify(context)
                    except CwmError as exc:
                        await call.abort(exc)
                await call.abort(
                    Unimplemented(
                        f"this manager has no method {method}; it serves "
                        "cwm.v1.WindowService, cwm.v1.SessionService, grpc.health.v1.Health "
                        "and server reflection (an older manager than the client?)",
                        reason="METHOD_NOT_FOUND",
                        metadata={"method": method},
                    )
                )

        return grpc.stream_stream_rpc_method_handler(handler)

    def _streaming(
        self, method: str, behavior: Callable[..., Any], prepare: Callable[[Any, _Call], Any]
    ) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behavior):
            return self._stream_response(method, behavior, prepare)
        return self._unary_response(method, behavior, prepare, streaming=True)
