"""Opening the bulk connection a manager offered: the transport, TLS when the offer says so
(with the gRPC channel's own CA and client certificate), and the hello with the ticket."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import tempfile
from collections.abc import Sequence

from cwm_client import pb
from cwm_client.bulk import shm
from cwm_client.bulk.frames import hello
from cwm_client.channels import Credentials
from cwm_client.errors import InvalidArgument, Unavailable

CONNECT_TIMEOUT_S = 2.0
"""How long a connect may take before the transfer goes on over gRPC instead: well inside
the ticket's life, and short enough that a blocked port costs little."""

IDLE_TIMEOUT_S = 60.0
"""How long one send or receive on a bulk connection may make no progress before the
transfer fails (UNAVAILABLE on a freeze, DATA_LOSS or the call's status on a thaw): a peer
that accepted the connection and went silent never hangs the client. A caller that stops
reading a thaw does not count: its receiving thread waits on its queue, not the socket."""

UNIX_BUFFER_BYTES = 1 << 20
"""The Unix socket's receive buffer (the manager sizes its send buffer alike; why: in
`cwm_server.manager.bulk.listener`)."""

SHM = pb.BulkTransport.BULK_TRANSPORT_SHM
UNIX = pb.BulkTransport.BULK_TRANSPORT_UNIX
TCP = pb.BulkTransport.BULK_TRANSPORT_TCP
TRANSPORTS = {
    "auto": ((SHM,) if shm.available() else ()) + (UNIX, TCP),
    "grpc": (),
    "shm": (SHM,),
    "unix": (UNIX,),
    "tcp": (TCP,),
}
"""What each `transport=` choice asks the manager for, preferred first (shared memory
first where this host has it: the manager offers it only to a caller on its own host)."""
NAMES = {SHM: "shm", UNIX: "unix", TCP: "tcp"}


class BulkUnreachable(Exception):
    """The manager offered a bulk connection that this client could not open (the call
    has been cancelled; the caller thaws again over gRPC, or fails if bulk was forced)."""

    def __init__(self, offer: pb.BulkOffer, cause: OSError) -> None:
        super().__init__(f"bulk endpoint {offer.address!r} unreachable: {cause}")
        self.offer = offer
        self.cause = cause


def bulk_transports(transport: str, owns_channel: bool = True) -> Sequence[int]:
    """The ThawRequest/OfferBulkFreezeRequest list for a `transport=` choice; "auto" on a
    caller's channel asks for none (the client does not know the manager's host)."""
    try:
        wanted = TRANSPORTS[transport]
    except KeyError:
        raise InvalidArgument(
            f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}",
            field="transport",
        ) from None
    if transport == "shm" and not shm.available():
        raise InvalidArgument(
            "transport='shm' needs memfd and SCM_RIGHTS (Linux); use 'unix' or 'auto'",
            field="transport",
        )
    return wanted if owns_channel or transport != "auto" else ()


def transport_name(offer: pb.BulkOffer) -> str:
    return NAMES.get(offer.transport, "tcp")


def no_bulk(transport: str, what: str) -> Unavailable:
    """The error of a transfer that insisted on a bulk transport it could not have."""
    return Unavailable(
        f"the manager offered no {transport} bulk channel this client could reach for this "
        f"{what} (is it on another host, behind a firewall, or started with the bulk "
        "channel off?); use transport='auto' to fall back to gRPC",
        reason="BULK_UNAVAILABLE",
    )


def target_host(target: str) -> str:
    """The host part of a gRPC target ("host:port", "dns:///host:port", "[v6]:port")."""
    rest = target
    for prefix in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if rest.startswith(prefix):
            rest = rest[len(prefix) :]
            break
    if rest.startswith("["):
        return rest[1 : rest.index("]")]
    return rest.rsplit(":", 1)[0] if ":" in rest else rest


def connect(offer: pb.BulkOffer, target: str, credentials: Credentials) -> socket.socket:
    """A connected bulk socket that has presented the offer's ticket (OSError if the
    endpoint cannot be reached; the caller goes on over gRPC)."""
    if offer.transport in (UNIX, SHM):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UNIX_BUFFER_BYTES)
            sock.settimeout(CONNECT_TIMEOUT_S)
            sock.connect(offer.address)
        except BaseException:
            sock.close()
            raise
    elif offer.transport == TCP:
        host, _, port = offer.address.rpartition(":")
        host = host.strip("[]") or target_host(target)
        sock = socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if offer.tls:
                sock = _tls_context(credentials).wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
    else:
        raise OSError(f"unknown bulk transport {offer.transport}")
    try:
        sock.sendall(hello(offer.ticket))
        sock.settimeout(IDLE_TIMEOUT_S)
    except BaseException:
        sock.close()
        raise
    return sock


def _tls_context(credentials: Credentials) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if credentials.root_certificates is not None:
        context = ssl.create_default_context(cadata=credentials.root_certificates.decode())
    if credentials.certificate_chain is not None and credentials.private_key is not None:
        # ssl loads a client certificate only from files: a private temporary pair.
        with tempfile.TemporaryDirectory(prefix="cwm-bulk-") as directory:
            cert = os.path.join(directory, "cert.pem")
            key = os.path.join(directory, "key.pem")
            for path, data in (
                (cert, credentials.certificate_chain),
                (key, credentials.private_key),
            ):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with contextlib.closing(os.fdopen(fd, "wb")) as out:
                    out.write(data)
            context.load_cert_chain(cert, key)
    return context
