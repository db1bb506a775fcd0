"""Exceptions into statuses a client can act on.

Servicer methods stay thin and raise `cwm_client.errors` classes; here they become the
status code, message and ``google.rpc.Status`` details (ErrorInfo, and BadRequest when a
field is known), with the request id in the trailing metadata. Anything else is a bug: it
is logged with its traceback and answered INTERNAL naming the request id, so a client's
mistake can never surface as UNKNOWN. Whatever happens, the call's code is set for the
log line and the metrics.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import NoReturn

import grpc
import grpc.aio
import structlog
from grpc_status import rpc_status

from cwm_client.errors import CwmError, Internal
from cwm_server.manager.rpc.interceptors.call import Call
from cwm_server.manager.rpc.interceptors.request_context import REQUEST_ID_KEY

log = structlog.get_logger("cwm.rpc")


async def abort(call: Call, error: CwmError) -> NoReturn:
    """End the call with `error`'s status and details (raises grpc.aio.AbortError)."""
    call.code = error.code
    status = rpc_status.to_status(error.to_status())
    trailing = (*status.trailing_metadata, (REQUEST_ID_KEY, call.request_id))
    await call.context.abort(status.code, status.details, trailing)
    raise AssertionError("ServicerContext.abort returned")  # pragma: no cover


def internal(call: Call, exc: BaseException) -> Internal:
    """The INTERNAL answer to an unexpected exception, which is logged with its traceback."""
    log.error("internal_error", exc_info=exc)
    return Internal(
        f"internal error in {call.method} (request id {call.request_id}); the manager's "
        "log has details"
    )


def _code_after_abort(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The code a servicer's own `context.abort` ended the call with."""
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - older grpc: no code() on the aio context
        return grpc.StatusCode.UNKNOWN
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


class MappedErrors:
    """``async with MappedErrors(call):`` answers whatever the block raises (see above).

    A cancelled call (the task cancelled, or a response stream closed by gRPC because the
    client went away) is recorded as CANCELLED and goes on being cancelled."""

    __slots__ = ("_call",)

    def __init__(self, call: Call) -> None:
        self._call = call

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        call = self._call
        if exc is None:
            return
        if isinstance(exc, CwmError):
            await abort(call, exc)
        elif isinstance(exc, grpc.aio.AbortError):
            call.code = _code_after_abort(call.context)
        elif isinstance(exc, asyncio.CancelledError | GeneratorExit):
            call.code = grpc.StatusCode.CANCELLED
        elif isinstance(exc, Exception):
            await abort(call, internal(call, exc))
