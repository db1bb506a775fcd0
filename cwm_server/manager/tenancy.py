"""Which tenant a call runs as: the one seam every servicer asks.

Servicers never decide a tenant themselves; they call `current_tenant(context)`, so the
authentication layer can change how a tenant is found without touching any RPC method.
"""

from __future__ import annotations

import grpc.aio

DEFAULT_TENANT = "default"
"""The tenant of every call when authentication is off (see docs/SECURITY.md)."""


def current_tenant(context: grpc.aio.ServicerContext) -> str:
    """The tenant the calling peer acts as."""
    del context
    return DEFAULT_TENANT
