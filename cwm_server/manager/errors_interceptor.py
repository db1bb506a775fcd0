"""Maps exceptions to `google.rpc.Status` for every RPC, in one place.

Servicer methods stay thin and raise `cwm_client.errors` classes; this interceptor turns them
into the status code, message and ErrorInfo/BadRequest details a client can act on. Anything
else is a bug: it is logged with its traceback and answered INTERNAL with a request id, so a
client's mistake can never surface as UNKNOWN.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import structlog
from google.protobuf.message import DecodeError
from grpc_status import rpc_status

from cwm_client.errors import CwmError, Internal, InvalidArgument

log = structlog.get_logger("cwm.rpc")


async def _abort(context: grpc.aio.ServicerContext, error: CwmError) -> None:
    status = rpc_status.to_status(error.to_status())
    await context.abort(status.code, status.details, status.trailing_metadata)


def _internal(method: str, exc: BaseException) -> Internal:
    request_id = uuid.uuid4().hex[:12]
    log.exception("internal_error", method=method, request_id=request_id, exc_info=exc)
    return Internal(
        f"internal error in {method} (request id {request_id}); the manager's log has details"
    )


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


async def _parse_stream(requests: AsyncIterator[Any], parse: Parse) -> AsyncIterator[Any]:
    async for raw in requests:
        yield parse(raw)


def _wrap_unary(
    method: str, behavior: Callable[..., Awaitable[Any]], parse: Parse
) -> Callable[..., Any]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(parse(request), context)
        except CwmError as exc:
            await _abort(context, exc)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - the one place unexpected errors land
            await _abort(context, _internal(method, exc))

    return handler


def _wrap_stream(
    method: str, behavior: Callable[..., AsyncIterator[Any]], parse: Parse
) -> Callable[..., Any]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in behavior(parse(request), context):
                yield response
        except CwmError as exc:
            await _abort(context, exc)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort(context, _internal(method, exc))

    return handler


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method  # type: ignore[attr-defined]
        parse = _parser(method, handler.request_deserializer)
        # request_deserializer=None: gRPC hands the raw bytes over and `parse` maps a bad
        # message to INVALID_ARGUMENT inside the wrappers.
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(method, handler.unary_unary, parse),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(
                    method, handler.stream_unary, lambda requests: _parse_stream(requests, parse)
                ),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(method, handler.unary_stream, parse),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        return handler
