"""Which tenant a call runs as: the one seam every servicer asks.

Servicers never decide a tenant themselves; they call `current_tenant(context)`. The
authentication layer (`auth.py`, run by `interceptors/authentication.py`) resolves the
caller before the servicer method starts and sets it in a context variable for the call.
Every RPC runs in its own asyncio task and a task copies the context it was
created in, so the value is the call's own: a unary method, the body of a streaming
method's async generator (iterated by the same task), and tasks it starts (Connect's
reader) all see it, and no call sees another's.
"""

from __future__ import annotations

import contextlib
import contextvars

import grpc.aio

from cwm_server.manager.rpc.auth import ADMIN, Caller

DEFAULT_TENANT = "default"
"""The tenant of every call when authentication is off (see docs/SECURITY.md)."""

ANONYMOUS = Caller(DEFAULT_TENANT, ADMIN)
"""The caller of every call when authentication is off."""

_CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("cwm_caller", default=ANONYMOUS)


def set_caller(caller: Caller) -> contextvars.Token[Caller]:
    """Make `caller` the caller of the running call (the interceptor does this)."""
    return _CALLER.set(caller)


def reset_caller(token: contextvars.Token[Caller]) -> None:
    # ValueError: finished in another context (a generator closed by its finaliser).
    with contextlib.suppress(ValueError):
        _CALLER.reset(token)


def current_caller(context: grpc.aio.ServicerContext | None = None) -> Caller:
    """The caller of the running call: tenant, role and how it authenticated."""
    del context
    return _CALLER.get()


def current_tenant(context: grpc.aio.ServicerContext | None = None) -> str:
    """The tenant the calling peer acts as."""
    return current_caller(context).tenant
