"""The port's TLS and the checks made before serving: server credentials from the
configured files, auth and TLS files that cannot work refused with the flag to fix, and a
loud warning for a manager reachable off loopback without authentication or TLS."""

from __future__ import annotations

import sys

import grpc
import structlog

from cwm_server.manager.config import ServerOptions
from cwm_server.manager.rpc.auth import Authenticator

log = structlog.get_logger("cwm.server")

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def check_server_options(options: ServerOptions) -> None:
    """Fail early, with a message naming the flag, on auth and TLS files that cannot work."""
    server_credentials(options)
    if options.auth_file is not None:
        Authenticator.from_file(options.auth_file)


def server_credentials(options: ServerOptions) -> grpc.ServerCredentials | None:
    """The port's TLS credentials (client certificates required with a client CA), or
    None for a plaintext port."""
    if options.tls_cert is None and options.tls_key is None:
        if options.tls_client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if options.tls_cert is None or options.tls_key is None:
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    client_ca = options.tls_client_ca.read_bytes() if options.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(options.tls_key.read_bytes(), options.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def warn_if_exposed(host: str, options: ServerOptions, tls: bool) -> None:
    """Loudly (log and stderr): a manager off loopback without authentication, or sending
    tokens in the clear."""
    if is_loopback(host):
        return
    if not options.auth_enabled:
        why = (
            f"the manager listens on {host} with NO AUTHENTICATION: anyone who reaches the "
            "port can read, write and delete every window; pass --auth-file (and TLS), or "
            "listen on 127.0.0.1"
        )
    elif not tls:
        why = (
            f"the manager listens on {host} without TLS: bearer tokens and KV bytes cross "
            "the network in the clear; pass --tls-cert and --tls-key"
        )
    else:
        return
    log.warning("insecure_listen", address=host, detail=why)
    print(f"WARNING: {why}", file=sys.stderr, flush=True)
