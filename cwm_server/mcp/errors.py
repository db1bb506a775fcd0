"""From a failed cwm call to a `ToolError` a model can act on.

The text starts with the gRPC code name (`NOT_FOUND: ...`), keeps the manager's message, and
ends with what to do next in terms of this bridge's tools: the manager's own hints name CLI
commands (`cwm ls`), which an MCP client cannot run.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from mcp.server.mcpserver.exceptions import ToolError

from cwm_client.errors import CwmError

# "...; `cwm ls` lists what exists": the manager's hint for CLI users.
_CLI_HINT = re.compile(r";\s*`cwm [^`]*`[^;]*$")


def _hint(exc: CwmError, message: str, manager: str) -> str:
    code = exc.code
    if code == grpc.StatusCode.NOT_FOUND:
        if exc.reason == "SESSION_NOT_FOUND" or message.startswith("no live session"):
            return "session_list shows the live sessions"
        if message.startswith("no connected agent"):
            return "cwm_health names the connected agents"
        return "window_list shows what exists"
    if code == grpc.StatusCode.ALREADY_EXISTS:
        if exc.field == "new_session_id" or "already has a session" in message:
            return "choose another new_session_id, or omit it to get a fresh one"
        return "choose another name, or window_delete the existing window first"
    if code == grpc.StatusCode.FAILED_PRECONDITION and "fingerprint" in message:
        return (
            "thaw onto an agent whose engine serves the same model (leave agent_id empty "
            "to let the manager pick one)"
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"is the manager running at {manager}? cwm_health checks"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "the manager or agent did not answer in time; retry, or check cwm_health"
    return ""


def describe(exc: CwmError, manager: str, *, hint: bool = True) -> str:
    """`CODE: message — what to do`, for the model to read."""
    message = _CLI_HINT.sub("", exc.message).strip()
    if exc.code == grpc.StatusCode.ALREADY_EXISTS:
        # The manager suggests `replace`, which these tools do not offer.
        message = message.split(";", 1)[0]
    text = f"{exc.code.name}: {message or 'the call failed'}"
    advice = _hint(exc, message, manager) if hint else ""
    return f"{text} — {advice}" if advice else text


def invalid_argument(message: str) -> ToolError:
    """A mistake the bridge catches before calling the manager, worded like the manager's."""
    return ToolError(f"{grpc.StatusCode.INVALID_ARGUMENT.name}: {message}")


@contextmanager
def tool_errors(manager: str) -> Iterator[None]:
    """Turn any `CwmError` raised inside into a `ToolError` (the call returns is_error)."""
    try:
        yield
    except CwmError as exc:
        raise ToolError(describe(exc, manager)) from None
