"""The manager's bulk channel: its endpoints, the offers gRPC calls make, and the transfers
that run on the connections that take them.

A thaw asks with `ThawRequest.bulk_transports`; a freeze's staging share with
`OfferBulkFreeze`. The offer names the first listed transport this manager has and the
caller can use (the Unix socket, and shared memory passed over it, only for a caller on
this host: its gRPC peer is loopback or a Unix socket) with a single-use ticket
(`tickets`). Everything that matters stays on gRPC
and in the same code as a gRPC transfer: the thaw stream's pins and bounded read-ahead, the
freeze stream's checks, bounded staging, durable store and (over gRPC) the commit; the
connection only carries the bytes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from cwm_client import pb
from cwm_client.bulk import shm
from cwm_client.bulk.connection import NAMES
from cwm_client.bulk.frames import BulkProtocolError, BulkResult, result_frame
from cwm_client.errors import CwmError, Internal, InvalidArgument
from cwm_server.manager.bulk.freeze_receiver import bulk_chunks
from cwm_server.manager.bulk.listener import (
    Endpoint,
    server_tls,
    tcp_endpoint,
    unix_endpoint,
)
from cwm_server.manager.bulk.thaw_sender import Fetched, send_chunks
from cwm_server.manager.bulk.tickets import TICKET_TTL_S, Ticket, TicketBook
from cwm_server.manager.config import ServerOptions
from cwm_server.manager.metrics import BulkMetrics
from cwm_server.manager.windows.freeze import FreezeStream
from cwm_server.manager.windows.header import validate_header
from cwm_server.manager.windows.manager import WindowManager
from cwm_server.manager.windows.thaw import ThawStream
from cwm_server.manager.windows.uploads import check_upload

log = structlog.get_logger("cwm.bulk")

UNIX = pb.BulkTransport.BULK_TRANSPORT_UNIX
TCP = pb.BulkTransport.BULK_TRANSPORT_TCP
SHM = pb.BulkTransport.BULK_TRANSPORT_SHM
SOCKET_NAME = "bulk.sock"
DRAIN_S = 5.0


def is_local_peer(peer: str) -> bool:
    """Whether a gRPC peer string ("ipv4:127.0.0.1:5", "ipv6:[::1]:5", "unix:...") is on
    this host's loopback or a Unix socket."""
    if peer.startswith("unix:"):
        return True
    if peer.startswith("ipv4:127."):
        return True
    return peer.startswith(("ipv6:[::1]", "ipv6:%5B::1%5D"))


def bulk_address(listen: str, grpc_port: int) -> tuple[str, int] | None:
    """Where the bulk TCP port binds for `--bulk-listen` `listen` ("auto": the gRPC host,
    the gRPC port + 1, or any free port when gRPC took an ephemeral one; "off": none)."""
    if listen == "off":
        return None
    if listen.startswith("auto:"):
        host, port = listen[5:].rsplit(":", 1)
        grpc_listen_port = int(port)
        return host.strip("[]"), (grpc_port + 1 if grpc_listen_port else 0)
    host, _, port = listen.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"--bulk-listen expects HOST:PORT, auto or off, got {listen!r}")
    return host.strip("[]"), int(port)


class BulkChannel:
    """The bulk endpoints of one manager and the transfers on them."""

    def __init__(
        self, manager: WindowManager, options: ServerOptions, metrics: BulkMetrics
    ) -> None:
        self._manager = manager
        self._options = options
        self._metrics = metrics
        self.tickets = TicketBook()
        self.endpoints: dict[int, Endpoint] = {}
        self.tcp_address = ""
        self.unix_path = ""
        self._receivers = concurrent.futures.ThreadPoolExecutor(
            max(2, manager.config.io_threads), thread_name_prefix="cwm-bulk-recv"
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Future[None]] = set()

    def start(self, grpc_listen: str, grpc_port: int) -> None:
        """Open the endpoints the options ask for (OSError naming the address if the TCP
        port cannot be had)."""
        self._loop = asyncio.get_running_loop()
        if self._options.bulk_unix:
            path = Path(self._manager.config.data_dir) / SOCKET_NAME
            sock = unix_endpoint(path)
            if sock is not None:
                self._add(Endpoint(sock, UNIX, self.tickets, self._metrics.refused))
                self.unix_path = str(path)
        listen = self._options.bulk_listen
        if listen == "auto":
            listen = f"auto:{grpc_listen}"
        where = bulk_address(listen, grpc_port)
        if where is not None:
            host, port = where
            try:
                sock = tcp_endpoint(host, port)
            except OSError as exc:
                raise OSError(
                    f"could not listen for bulk transfers on {host}:{port} ({exc.strerror}); "
                    "pick another with --bulk-listen HOST:PORT, or --bulk-listen off"
                ) from None
            tls = None
            if self._options.tls_cert is not None and self._options.tls_key is not None:
                tls = server_tls(
                    self._options.tls_cert, self._options.tls_key, self._options.tls_client_ca
                )
            self._add(Endpoint(sock, TCP, self.tickets, self._metrics.refused, tls))
            bound_host, bound_port = sock.getsockname()[:2]
            shown = "" if bound_host in ("0.0.0.0", "::") else bound_host
            shown = f"[{shown}]" if ":" in shown else shown
            self.tcp_address = f"{shown}:{bound_port}"
        for endpoint in self.endpoints.values():
            endpoint.start()

    def describe(self) -> str:
        """Where the bulk endpoints listen, for `cwm status` ("off" if nowhere)."""
        parts = []
        if self.tcp_address:
            tls = self.endpoints[TCP].tls is not None
            parts.append(f"tcp {self.tcp_address}" + (" (TLS)" if tls else ""))
        if self.unix_path:
            shared = SHM in self.endpoints[UNIX].accepts
            parts.append(f"unix {self.unix_path}" + (" (and shm)" if shared else ""))
        return ", ".join(parts) or "off"

    def _add(self, endpoint: Endpoint) -> None:
        self.endpoints[endpoint.transport] = endpoint

    async def close(self) -> None:
        for endpoint in self.endpoints.values():
            endpoint.close()
        if self.unix_path:
            with contextlib.suppress(FileNotFoundError):
                Path(self.unix_path).unlink()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._receivers.shutdown(wait=False, cancel_futures=True)

    def _choose(self, wanted: Any, peer: str) -> tuple[Endpoint, int] | None:
        """The endpoint and transport to offer: the first of `wanted` that this manager
        has and the peer can use."""
        for transport in wanted:
            endpoint = self.endpoints.get(UNIX if transport == SHM else transport)
            if endpoint is None or transport not in endpoint.accepts:
                continue
            if transport in (UNIX, SHM) and not is_local_peer(peer):
                continue
            return endpoint, transport
        return None

    def _offer(self, endpoint: Endpoint, transport: int, secret: bytes) -> pb.BulkOffer:
        unix = endpoint.transport == UNIX
        return pb.BulkOffer(
            transport=transport,  # type: ignore[arg-type]
            address=self.unix_path if unix else self.tcp_address,
            ticket=secret,
            expires_in_ms=int(TICKET_TTL_S * 1000),
            tls=endpoint.tls is not None,
        )

    # -- thaw ------------------------------------------------------------------------------

    async def thaw(
        self, stream: ThawStream, request: pb.ThawRequest, tenant: str, peer: str
    ) -> AsyncIterator[Any]:
        """The rest of a Thaw call after its window: the chunks on its gRPC stream, or a
        BulkOffer and then (once the client connected) nothing more on gRPC while the
        chunks go on the connection. An offer not taken in time goes on over gRPC."""
        async for response in self.offered(
            stream.refs,
            request.bulk_transports,
            tenant,
            peer,
            lambda offer: [pb.ThawResponse(bulk=offer)],
            stream.fetched,
            stream.responses,
            what=f"window {stream.window.name!r}",
        ):
            yield response

    async def offered(
        self,
        refs: Sequence[pb.ChunkRef],
        wanted: Sequence[int],
        tenant: str,
        peer: str,
        offer_messages: Callable[[pb.BulkOffer], Sequence[Any]],
        fetched: Fetched,
        fallback: Callable[[], AsyncIterator[Any]],
        what: str,
    ) -> AsyncIterator[Any]:
        """The messages of a call whose chunks `refs` may go on a bulk connection: those
        that carry the offer (`offer_messages`), then nothing more once the client
        connected and `fetched` was sent there; `fallback()`'s messages (everything on
        gRPC) where no offer can be made or it is not taken in time."""
        chosen = None
        if refs:
            mean_chunk = sum(ref.raw_size for ref in refs) / len(refs)
            chosen = self._choose(shm.preferred(wanted, mean_chunk), peer)
        if chosen is None:
            async for response in fallback():
                yield response
            return
        endpoint, transport = chosen
        loop = asyncio.get_running_loop()
        connected: asyncio.Future[socket.socket] = loop.create_future()

        def deliver(sock: socket.socket) -> None:  # on a listener thread
            loop.call_soon_threadsafe(_resolve, connected, sock)

        secret = self.tickets.issue(Ticket(tenant, transport, deliver))
        for message in offer_messages(self._offer(endpoint, transport, secret)):
            yield message
        try:
            sock = await asyncio.wait_for(connected, TICKET_TTL_S)
        except TimeoutError:
            self.tickets.revoke(secret)  # before the rest goes over gRPC, not after it
            self._metrics.fallback("thaw")
            log.info("bulk_offer_unused", tenant=tenant, what=what)
            async for response in fallback():
                yield response
            return
        finally:
            self.tickets.revoke(secret)
            if not connected.done():
                connected.cancel()
        window_chunks = self._manager.config.stream_window_chunks
        sent = await send_chunks(fetched, sock, window_chunks, shared_memory=transport == SHM)
        self._metrics.transferred(NAMES[transport], "thaw", sent)

    # -- freeze ----------------------------------------------------------------------------

    async def offer_freeze(
        self, tenant: str, request: pb.OfferBulkFreezeRequest, peer: str
    ) -> pb.OfferBulkFreezeResponse:
        header = request.header
        if not header.upload_id or not header.stage_only:
            raise InvalidArgument(
                "a bulk freeze stages one share of an upload: the header needs upload_id "
                "and stage_only (the window is committed by a Freeze with the same upload_id)",
                field="header.upload_id",
            )
        check_upload(header)
        validate_header(header, self._manager.config.max_chunk_bytes)
        chosen = self._choose(request.bulk_transports, peer)
        if chosen is None:
            return pb.OfferBulkFreezeResponse()
        endpoint, transport = chosen
        loop = asyncio.get_running_loop()
        staged = pb.FreezeHeader()
        staged.CopyFrom(header)

        def deliver(sock: socket.socket) -> None:  # on a listener thread
            loop.call_soon_threadsafe(self._start_freeze, tenant, staged, sock, transport)

        secret = self.tickets.issue(Ticket(tenant, transport, deliver))
        return pb.OfferBulkFreezeResponse(offer=self._offer(endpoint, transport, secret))

    def _start_freeze(
        self, tenant: str, header: pb.FreezeHeader, sock: socket.socket, transport: int
    ) -> None:
        task = asyncio.ensure_future(self._run_freeze(tenant, header, sock, transport))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_freeze(
        self, tenant: str, header: pb.FreezeHeader, sock: socket.socket, transport: int
    ) -> None:
        manager = self._manager
        max_chunk = manager.config.max_chunk_bytes
        shared_memory = transport == SHM
        try:
            stream = FreezeStream(manager, tenant)
            try:
                response = await stream.store(
                    header,
                    lambda h, spans: bulk_chunks(
                        sock, h, spans, max_chunk, self._receivers, shared_memory
                    ),
                )
                result = BulkResult(0, response.chunks_received, response.bytes_received)
                self._metrics.transferred(NAMES[transport], "freeze", response.bytes_received)
            except CwmError as exc:
                result = BulkResult(exc.code.value[0], 0, 0, exc.to_status().SerializeToString())
            except (OSError, BulkProtocolError) as exc:
                log.info("bulk_freeze_ended", tenant=tenant, upload=header.upload_id, why=str(exc))
                return
            except Exception as exc:
                log.exception("bulk_freeze_failed", tenant=tenant, upload=header.upload_id)
                internal = Internal(f"the bulk freeze failed: {exc}")
                result = BulkResult(
                    internal.code.value[0], 0, 0, internal.to_status().SerializeToString()
                )
            with contextlib.suppress(OSError):
                await asyncio.wrap_future(
                    self._receivers.submit(_answer, sock, result, shared_memory)
                )
        finally:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def _answer(sock: socket.socket, result: BulkResult, shared_memory: bool) -> None:
    """Send a freeze connection's result (on shared memory after the marker that tells it
    from the acknowledgements). After a refusal the client may still be sending: read and
    drop what it sends until it closes (for at most `DRAIN_S`), so closing does not reset
    the connection and lose the result before the client read it."""
    sock.sendall((shm.RESULT_MARK if shared_memory else b"") + result_frame(result))
    if result.code == 0:
        return
    sock.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + DRAIN_S
    with contextlib.suppress(OSError):
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(1 << 16):  # files passed with what is dropped are closed too
                return


def _resolve(future: asyncio.Future[socket.socket], sock: socket.socket) -> None:
    if future.done():  # the call ended before its connection came
        sock.close()
    else:
        future.set_result(sock)
