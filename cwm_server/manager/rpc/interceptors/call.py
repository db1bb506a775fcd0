"""One RPC as it runs: the state its concerns share (see the package docstring)."""

from __future__ import annotations

import time

import grpc
import grpc.aio

from cwm_server.manager.metrics import CallMetrics


class Call:
    """What the concerns of one call read and write: who it is, how it ended."""

    __slots__ = (
        "code",
        "context",
        "method",
        "metrics",
        "request_id",
        "started",
        "streaming",
        "tenant",
    )

    def __init__(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        request_id: str,
        metrics: CallMetrics | None,
        streaming: bool,
    ) -> None:
        self.method = method
        """The full method name, ``/package.Service/Method``."""
        self.context = context
        self.request_id = request_id
        self.metrics = metrics
        """The call's recorder; None when the manager keeps no metrics."""
        self.streaming = streaming
        """Either side streams (such calls count as streams in flight)."""
        self.started = time.perf_counter()
        self.code = grpc.StatusCode.OK
        """How the call ended: set by the error mapping, reported by the log and metrics."""
        self.tenant = ""
        """The authenticated caller's tenant ("" when auth is off or the method is open)."""
