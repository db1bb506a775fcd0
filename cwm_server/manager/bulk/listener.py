"""The bulk endpoints: a Unix socket under the data dir and a TCP port (TLS when the gRPC
port is), and what every connection must do before it carries a byte.

Each endpoint has an accept thread; each new connection gets a thread of its own for its
hello (at most `MAX_PENDING` at once; more are closed at once), which must arrive within
`HELLO_TIMEOUT_S` and hold the magic and a ticket this manager issued for this transport.
A Unix peer must also run as this manager's user (or root). A connection that fails any
of this is closed without a byte sent, counted, and logged without the ticket.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from cwm_client import pb
from cwm_client.bulk import shm
from cwm_client.bulk.frames import HELLO_BYTES, MAGIC, BulkProtocolError, recv_exactly
from cwm_server.manager.bulk.tickets import TicketBook

log = structlog.get_logger("cwm.bulk")

HELLO_TIMEOUT_S = 5.0
MAX_PENDING = 64
UNIX_BUFFER_BYTES = 1 << 20
"""A Unix socket's send buffer (the client sizes its receive buffer alike): with the
default of about 200 KiB a 32 MiB chunk takes some 160 wake-ups of each side; 1 MiB made
same-host thaws faster here (docs/BENCHMARKS.md). TCP sizes its own buffers."""
UNIX_PATH_MAX = 107
CERT_URI_SCHEME = "cwm://"
"""A client certificate's identity URI, as `rpc.auth` reads it on the gRPC port."""


class Endpoint:
    """One listening socket and its accept thread."""

    def __init__(
        self,
        sock: socket.socket,
        transport: int,
        tickets: TicketBook,
        refused: Callable[[str, str], None],
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.sock = sock
        self.transport = transport
        self.accepts: frozenset[int] = frozenset({transport})
        """The transports whose tickets this endpoint takes: the Unix socket also carries
        shared-memory transfers (their files pass over it)."""
        if transport == pb.BulkTransport.BULK_TRANSPORT_UNIX and shm.available():
            self.accepts = frozenset({transport, pb.BulkTransport.BULK_TRANSPORT_SHM})
        self.tls = tls
        self._tickets = tickets
        self._refused = refused
        self._pending = threading.BoundedSemaphore(MAX_PENDING)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_forever, daemon=True, name="cwm-bulk")

    @property
    def name(self) -> str:
        return "unix" if self.transport == pb.BulkTransport.BULK_TRANSPORT_UNIX else "tcp"

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self.sock.close()
        self._thread.join(timeout=5)

    def _accept_forever(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                if self._closed.is_set():
                    return
                continue
            if not self._pending.acquire(blocking=False):
                conn.close()
                self._refused(self.name, "too_many_pending")
                continue
            threading.Thread(target=self._greet, args=(conn,), daemon=True).start()

    def _greet(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(HELLO_TIMEOUT_S)
            if self.transport == pb.BulkTransport.BULK_TRANSPORT_TCP:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                why = _foreign_peer(conn)
                if why:
                    self._refuse(conn, why)
                    return
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_BUFFER_BYTES)
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            hello = bytearray(HELLO_BYTES)
            recv_exactly(conn, hello)
            if bytes(hello[: len(MAGIC)]) != MAGIC:
                self._refuse(conn, "bad_magic")
                return
            ticket = self._tickets.redeem(bytes(hello[len(MAGIC) :]), self.accepts)
            if ticket is None:
                self._refuse(conn, "unknown_ticket")
                return
            certified = _certificate_tenant(conn)
            if certified is not None and certified != ticket.tenant:
                self._refuse(conn, "tenant_mismatch")
                return
            conn.settimeout(None)
            ticket.deliver(conn)
        except (OSError, BulkProtocolError, ssl.SSLError, ValueError):
            self._refuse(conn, "no_hello")
        finally:
            self._pending.release()

    def _refuse(self, conn: socket.socket, why: str) -> None:
        with contextlib.suppress(OSError):
            conn.close()
        self._refused(self.name, why)
        log.info("bulk_refused", transport=self.name, why=why)


def _foreign_peer(conn: socket.socket) -> str:
    """Why a Unix peer may not use this endpoint ("" if it may)."""
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return "no_peer_credentials"
    _pid, uid, _gid = struct.unpack("3i", creds)
    return "" if uid in (0, os.geteuid()) else "foreign_user"


def _certificate_tenant(conn: socket.socket) -> str | None:
    """The tenant a verified client certificate names (``cwm://TENANT/ROLE``), if any: a
    connection certified as one tenant never carries another tenant's transfer."""
    if not isinstance(conn, ssl.SSLSocket):
        return None
    peer = conn.getpeercert() or {}
    for kind, value in peer.get("subjectAltName", ()):
        if kind == "URI" and str(value).startswith(CERT_URI_SCHEME):
            return str(value)[len(CERT_URI_SCHEME) :].partition("/")[0]
    return None


def unix_endpoint(path: Path) -> socket.socket | None:
    """A listening Unix socket at `path` (owner-only), or None when the path is too long
    for a socket address."""
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        log.warning("bulk_unix_off", path=str(path), why="path too long for a Unix socket")
        return None
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # left by a manager that died: the data-dir lock says none runs now
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def tcp_endpoint(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    sock.listen(128)
    return sock


def server_tls(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    """The bulk port's TLS: the gRPC port's certificate, and its client CA when set."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # No TLS 1.3 session tickets: a record after the handshake that carries no data would
    # look, to a freezing client watching for the manager's early answer, like one.
    context.num_tickets = 0
    context.load_cert_chain(str(cert), str(key))
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(str(client_ca))
    return context
