"""Request ids and the log context of a call, and the one ``rpc`` log line it ends with.

A client may send ``x-request-id`` in its metadata (printable ASCII without spaces, at most
128 characters); otherwise the manager makes one. It is bound into structlog's context
variables for the whole RPC, so every log line the call causes carries it, and it goes
back to the client in the trailing metadata under the same key, with an error too (the
error mapping adds it to the details it sends).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import grpc
import structlog

from cwm_server.manager.rpc.interceptors.call import Call

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
def bound_to_logs(**values: str) -> Iterator[None]:
    """`values` in structlog's context variables until the block ends."""
    tokens = structlog.contextvars.bind_contextvars(**values)
    try:
        yield
    finally:
        # ValueError: finished in another context (a generator closed by its finaliser).
        with suppress(ValueError):
            structlog.contextvars.reset_contextvars(**tokens)


@contextmanager
def in_request_context(call: Call) -> Iterator[None]:
    """Echo the call's request id, bind it and the method into the logs, and log the
    call's outcome when it ends."""
    call.context.set_trailing_metadata(((REQUEST_ID_KEY, call.request_id),))
    with bound_to_logs(request_id=call.request_id, method=call.method):
        try:
            yield
        finally:
            _log_outcome(call)


def _log_outcome(call: Call) -> None:
    seconds = time.perf_counter() - call.started
    quiet = call.method.startswith(_QUIET_PREFIXES) and call.code is grpc.StatusCode.OK
    extra = {"tenant": call.tenant} if call.tenant else {}
    (log.debug if quiet else log.info)(
        "rpc", code=call.code.name, duration_ms=round(seconds * 1000, 3), **extra
    )
