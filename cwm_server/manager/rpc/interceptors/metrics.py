"""A call's place in the RPC metrics (`cwm_server.manager.metrics`): its recorder, the
streams-in-flight gauge while it runs and its duration by final status code.

Messages and bytes are counted where they are parsed and serialized (`serialization`),
by the recorder made here, so no message is looked at twice.
"""

from __future__ import annotations

import time
from types import TracebackType

from cwm_server.manager.metrics import CallMetrics, RpcMetrics, method_label
from cwm_server.manager.rpc.interceptors.call import Call


def recorder_for(metrics: RpcMetrics | None, method: str) -> CallMetrics | None:
    """The recorder of one call of `method` (its labelled series looked up once), or None
    when the manager keeps no metrics."""
    return None if metrics is None else CallMetrics(metrics, method_label(method))


class Recorded:
    """While the block runs the call counts as a stream in flight (if it streams); when it
    ends its duration is observed under its final code."""

    __slots__ = ("_call",)

    def __init__(self, call: Call) -> None:
        self._call = call

    def __enter__(self) -> None:
        call = self._call
        if call.metrics is not None and call.streaming:
            call.metrics.stream_opened()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        call = self._call
        if call.metrics is None:
            return
        if call.streaming:
            call.metrics.stream_closed()
        call.metrics.finished(call.code.name, time.perf_counter() - call.started)
