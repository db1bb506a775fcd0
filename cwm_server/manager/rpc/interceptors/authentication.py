"""Who a call runs as, settled before its request is parsed.

With an `Authenticator` (`cwm_server.manager.rpc.auth`), the caller is resolved from the
metadata and TLS peer and authorized for the method before a byte of the request is
parsed, so an unauthenticated peer learns nothing from its bytes; it then is the call's
caller (`tenancy.current_tenant`) and its tenant and role are bound into the log context.
A refusal is an Unauthenticated or PermissionDenied, which the error mapping answers.
Health checks and reflection stay open.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from cwm_server.manager.rpc.auth import Authenticator, authorize, is_open
from cwm_server.manager.rpc.interceptors.call import Call
from cwm_server.manager.rpc.interceptors.request_context import bound_to_logs
from cwm_server.manager.rpc.tenancy import reset_caller, set_caller


@contextmanager
def as_caller(auth: Authenticator | None, call: Call) -> Iterator[None]:
    """Resolve and authorize the caller (raising Unauthenticated or PermissionDenied) and
    make it the call's caller until the block ends; no-op when auth is off."""
    if auth is None or is_open(call.method):
        yield
        return
    caller = auth.identify(call.context)
    call.tenant = caller.tenant
    authorize(caller, call.method)
    token = set_caller(caller)
    try:
        with bound_to_logs(tenant=caller.tenant, role=caller.role):
            yield
    finally:
        reset_caller(token)


def identify(auth: Authenticator | None, call: Call) -> None:
    """Raise Unauthenticated unless the peer is someone (a method this server lacks is
    named only to those it would answer)."""
    if auth is not None and not is_open(call.method):
        auth.identify(call.context)
