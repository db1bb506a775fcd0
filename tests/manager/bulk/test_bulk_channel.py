"""The bulk channel: freezes and thaws over shared memory, a Unix socket and a TCP port
beside gRPC, with
the same bytes, order and checks as gRPC, and connections that carry nothing unless they
present a live, single-use ticket issued by their gRPC call."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cwm_client import WindowClient, pb
from cwm_client.bulk.frames import MAGIC, BulkResult, chunk_head, end_frame, read_result
from cwm_client.bulk.freeze_sender import raise_for
from cwm_client.errors import CwmError, DataLoss, InvalidArgument, Unavailable
from cwm_server.manager.bulk import channel as bulk_channel
from cwm_server.manager.bulk import tickets as bulk_tickets
from cwm_server.manager.config import ManagerConfig, ServerOptions
from tests.helpers import (
    FINGERPRINT,
    ThreadedManager,
    chunk_files,
    eventually,
    staging_header,
    synthetic_chunks,
    token_ids,
)
from tests.tls_certs import CertificateAuthority

TOKENS = 256 * 10
CHUNKS = synthetic_chunks(TOKENS, seed=5)
IDS = token_ids(TOKENS, seed=5)
UNIX = pb.BulkTransport.BULK_TRANSPORT_UNIX
TCP = pb.BulkTransport.BULK_TRANSPORT_TCP
SHM = pb.BulkTransport.BULK_TRANSPORT_SHM


def start(root: Path, options: ServerOptions | None = None) -> ThreadedManager:
    config = ManagerConfig(
        data_dir=root / "data", listen="127.0.0.1:0", fsync=False, upload_ttl_s=1.0
    )
    return ThreadedManager(config, options)


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedManager]:
    running = start(tmp_path_factory.mktemp("bulk"))
    with WindowClient(running.target) as client:
        client.freeze("w", CHUNKS, fingerprint=FINGERPRINT, token_ids=IDS, transport="grpc")
    yield running
    running.stop()


def refused(manager: ThreadedManager, reason: str) -> float:
    value = manager.server.metrics.registry.get_sample_value(
        "cwm_bulk_refused_total", {"transport": "tcp", "reason": reason}
    )
    unix = manager.server.metrics.registry.get_sample_value(
        "cwm_bulk_refused_total", {"transport": "unix", "reason": reason}
    )
    return (value or 0.0) + (unix or 0.0)


def offered_thaw(
    manager: ThreadedManager, transports: list[int], name: str = "w"
) -> tuple[grpc.Channel, Iterator[pb.ThawResponse], pb.WindowInfo, pb.BulkOffer]:
    channel = grpc.insecure_channel(manager.target)
    call = pb.WindowServiceStub(channel).Thaw(
        pb.ThawRequest(name=name, bulk_transports=transports), timeout=30
    )
    window = next(call).window
    second = next(call)
    assert second.WhichOneof("payload") == "bulk"
    return channel, call, window, second.bulk


def dial(manager: ThreadedManager, offer: pb.BulkOffer) -> socket.socket:
    if offer.transport in (UNIX, SHM):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(offer.address)
    else:
        host, _, port = offer.address.rpartition(":")
        sock = socket.create_connection((host or "127.0.0.1", int(port)))
    sock.settimeout(10)
    return sock


def nothing_comes(sock: socket.socket) -> bool:
    """The manager closes the connection without sending a byte."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()


def refusal_of(result: BulkResult) -> CwmError:
    with pytest.raises(CwmError) as caught:
        raise_for(result)
    return caught.value


def endpoint_address(manager: ThreadedManager, transport: int) -> tuple[int, str]:
    bulk = manager.server.bulk
    return transport, bulk.unix_path if transport == UNIX else bulk.tcp_address


@pytest.mark.parametrize("transport", ["grpc", "shm", "unix", "tcp"])
def test_freeze_and_thaw_over_each_transport_are_bit_identical(
    manager: ThreadedManager, transport: str
) -> None:
    chunks = synthetic_chunks(TOKENS, seed=11 + ["grpc", "unix", "tcp", "shm"].index(transport))
    with WindowClient(manager.target) as client:
        result = client.freeze(
            f"by-{transport}", chunks, fingerprint=FINGERPRINT, token_ids=IDS, transport=transport
        )
        assert result.transport == transport
        assert result.chunks_sent == len(chunks) and result.window.chunk_count == len(chunks)
        with client.thaw(f"by-{transport}", transport=transport) as stream:
            assert stream.transport == transport
            assert [bytes(c.data) for c in stream] == [c.data() for c in chunks]
            assert stream.window.token_ids == IDS
        with client.thaw(f"by-{transport}", first_chunk=3, chunk_count=4, transport=transport) as s:
            got = [(c.index, bytes(c.data)) for c in s]
        assert got == [(c.index, c.data()) for c in chunks[3:7]]


@pytest.mark.parametrize("large", [True, False], ids=["large-chunks", "small-chunks"])
def test_auto_takes_shared_memory_for_large_chunks_on_this_host_else_the_unix_socket(
    manager: ThreadedManager, monkeypatch: pytest.MonkeyPatch, large: bool
) -> None:
    """And an incremental freeze sends only the new chunks."""
    from cwm_client.bulk import shm

    if large:  # as if these chunks were an 8B model's 32 MiB ones
        monkeypatch.setattr(shm, "MIN_CHUNK_BYTES", CHUNKS[0].raw_size)
    else:
        assert CHUNKS[0].raw_size < shm.MIN_CHUNK_BYTES
    expected = "shm" if large else "unix"
    with WindowClient(manager.target) as client:
        # Large: window "w" grown by two chunks (only those are sent); small: a new window.
        grown = synthetic_chunks(TOKENS + 512, seed=5 if large else 55)
        ids = token_ids(TOKENS + 512, seed=5)
        name = f"grown-{expected}"
        result = client.freeze(name, grown, fingerprint=FINGERPRINT, token_ids=ids)
        assert result.transport == expected
        if large:
            assert [c.data() for c in grown[: len(CHUNKS)]] == [c.data() for c in CHUNKS]
            assert result.chunks_sent == 2
        with client.thaw(name) as stream:
            assert stream.transport == expected
            assert [bytes(c.data) for c in stream] == [c.data() for c in grown]
        with client.thaw(name, transport="shm") as stream:  # asked for alone: always taken
            assert stream.transport == "shm"
            assert [bytes(c.data) for c in stream] == [c.data() for c in grown]


@pytest.mark.parametrize("transport", [UNIX, TCP])
@pytest.mark.parametrize(
    "hello",
    [b"", b"CWM", os.urandom(40), MAGIC + os.urandom(32), b"XXXXXXXX" + b"\0" * 32],
    ids=["nothing", "truncated", "garbage", "forged-ticket", "bad-magic"],
)
def test_a_connection_without_a_valid_ticket_gets_no_byte(
    manager: ThreadedManager, transport: int, hello: bytes
) -> None:
    kind, address = endpoint_address(manager, transport)
    before = len(manager.server.bulk.tickets)
    sock = dial(manager, pb.BulkOffer(transport=kind, address=address))  # type: ignore[arg-type]
    sock.sendall(hello)
    sock.shutdown(socket.SHUT_WR)
    assert nothing_comes(sock)
    assert len(manager.server.bulk.tickets) == before
    with WindowClient(manager.target) as client:  # the manager serves on
        assert client.get("w").chunk_count == len(CHUNKS)


def test_a_ticket_carries_one_connection_only(manager: ThreadedManager) -> None:
    channel, call, window, offer = offered_thaw(manager, [TCP])
    with channel:
        first = dial(manager, offer)
        first.sendall(MAGIC + offer.ticket)
        head = first.recv(24, socket.MSG_WAITALL)
        assert len(head) == 24  # the transfer runs
        again = dial(manager, offer)
        again.sendall(MAGIC + offer.ticket)
        assert nothing_comes(again)
        first.close()
        with pytest.raises(grpc.RpcError):
            list(call)  # the client went away mid-transfer: the call ends in an error
    assert window.chunk_count == len(CHUNKS)
    assert eventually(lambda: not manager.manager.pins.held())


def test_a_ticket_offered_for_tcp_gets_no_byte_on_the_unix_socket(
    manager: ThreadedManager,
) -> None:
    channel, call, _, offer = offered_thaw(manager, [TCP])
    with channel:
        unix = dial(manager, pb.BulkOffer(transport=UNIX, address=manager.server.bulk.unix_path))
        unix.sendall(MAGIC + offer.ticket)
        assert nothing_comes(unix)
        call.cancel()


def test_a_ticket_offered_for_shared_memory_gets_no_byte_on_the_tcp_port(
    manager: ThreadedManager,
) -> None:
    channel, call, _, offer = offered_thaw(manager, [SHM])
    assert offer.transport == SHM and offer.address == manager.server.bulk.unix_path
    with channel:
        tcp = dial(manager, pb.BulkOffer(transport=TCP, address=manager.server.bulk.tcp_address))
        tcp.sendall(MAGIC + offer.ticket)
        assert nothing_comes(tcp)
        call.cancel()


def test_a_shared_memory_thaw_sends_each_chunk_as_a_sealed_file_and_nothing_on_the_socket(
    manager: ThreadedManager,
) -> None:
    from cwm_client.bulk import shm

    channel, call, window, offer = offered_thaw(manager, [SHM])
    with channel:
        sock = dial(manager, offer)
        sock.sendall(MAGIC + offer.ticket)
        got = []
        for ref in window.chunks:
            head, fd = shm.receive_frame(sock)
            assert fd is not None and head.index == ref.index
            with shm.closing(fd):
                got.append(bytes(shm.map_sealed(fd, head.length)))
            shm.acknowledge(sock)
        head, fd = shm.receive_frame(sock)
        assert head.is_end and fd is None
        assert nothing_comes(sock)  # the manager closed (it reads no more acknowledgements)
        assert list(call) == []
    assert got == [c.data() for c in CHUNKS]


def test_an_expired_ticket_gets_no_byte_and_the_thaw_goes_on_over_grpc(
    manager: ThreadedManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bulk_tickets, "TICKET_TTL_S", 0.3)
    monkeypatch.setattr(bulk_channel, "TICKET_TTL_S", 0.3)
    fallbacks = (
        manager.server.metrics.registry.get_sample_value(
            "cwm_bulk_fallbacks_total", {"direction": "thaw"}
        )
        or 0.0
    )
    channel, call, window, offer = offered_thaw(manager, [TCP])
    with channel:
        time.sleep(0.6)
        late = dial(manager, offer)
        late.sendall(MAGIC + offer.ticket)
        assert nothing_comes(late)
        parts = [m.chunk for m in call]
    data: dict[int, bytearray] = {}
    for part in parts:
        data.setdefault(part.index, bytearray()).extend(part.data)
    assert [bytes(data[i]) for i in sorted(data)] == [c.data() for c in CHUNKS]
    after = manager.server.metrics.registry.get_sample_value(
        "cwm_bulk_fallbacks_total", {"direction": "thaw"}
    )
    assert after == fallbacks + 1
    assert window.chunk_count == len(CHUNKS)


def test_a_freeze_cut_off_mid_transfer_leaves_no_window_and_its_chunks_are_collected(
    manager: ThreadedManager,
) -> None:
    chunks = synthetic_chunks(TOKENS, seed=99)
    header = staging_header("cut-off", chunks, IDS, "up-cut-off-1")
    with grpc.insecure_channel(manager.target) as channel:
        stub = pb.WindowServiceStub(channel)
        offer = stub.OfferBulkFreeze(
            pb.OfferBulkFreezeRequest(header=header, bulk_transports=[UNIX])
        ).offer
        sock = dial(manager, offer)
        sock.sendall(MAGIC + offer.ticket)
        for chunk in chunks[:4]:
            sock.sendall(
                chunk_head(
                    chunk.index, pb.ChunkCodec.CHUNK_CODEC_RAW, chunk.raw_size, chunk.raw_size
                )
            )
            sock.sendall(chunk.data())
        sock.sendall(
            chunk_head(4, pb.ChunkCodec.CHUNK_CODEC_RAW, chunks[4].raw_size, chunks[4].raw_size)
        )
        sock.sendall(chunks[4].data()[:1000])
        sock.close()  # the client dies in the middle of chunk 4
        with WindowClient(manager.target) as client:
            assert "cut-off" not in [w.name for w in client.list()]
    digests = {c.digest.hex() for c in chunks}
    assert eventually(
        lambda: not digests & {p.name for p in chunk_files(manager.config.data_dir)}, timeout=15
    )


def test_a_bulk_freeze_frame_that_lies_is_refused_with_a_reason_and_nothing_is_stored(
    manager: ThreadedManager,
) -> None:
    chunks = synthetic_chunks(TOKENS, seed=123)
    header = staging_header("liar", chunks, IDS, "up-liar-0001")
    with grpc.insecure_channel(manager.target) as channel:
        stub = pb.WindowServiceStub(channel)
        for head, why in [
            (chunk_head(0, 1, chunks[0].raw_size, 1 << 60), "chunk.data"),  # a huge length
            (chunk_head(0, 1, 12345, 12345), "chunk.raw_size"),
            (chunk_head(99, 1, chunks[0].raw_size, chunks[0].raw_size), "chunk.index"),
            (chunk_head(0, 77, chunks[0].raw_size, chunks[0].raw_size), "chunk.codec"),
        ]:
            offer = stub.OfferBulkFreeze(
                pb.OfferBulkFreezeRequest(header=header, bulk_transports=[TCP])
            ).offer
            sock = dial(manager, offer)
            sock.sendall(MAGIC + offer.ticket + head)
            refusal = refusal_of(read_result(sock))
            sock.close()
            assert isinstance(refusal, InvalidArgument), refusal
            assert refusal.field == why
        # a chunk whose bytes are not its digest's
        offer = stub.OfferBulkFreeze(
            pb.OfferBulkFreezeRequest(header=header, bulk_transports=[TCP])
        ).offer
        sock = dial(manager, offer)
        sock.sendall(MAGIC + offer.ticket)
        sock.sendall(chunk_head(0, 1, chunks[0].raw_size, chunks[0].raw_size))
        sock.sendall(chunks[1].data()[: chunks[0].raw_size])
        sock.sendall(end_frame())
        refusal = refusal_of(read_result(sock))
        sock.close()
        assert isinstance(refusal, DataLoss) and refusal.reason == "DIGEST_MISMATCH"
    digests = {c.digest.hex() for c in chunks}
    assert eventually(
        lambda: not digests & {p.name for p in chunk_files(manager.config.data_dir)}, timeout=15
    )


@pytest.mark.parametrize("what", ["no-file", "unsealed", "wrong-size", "a-pipe"])
def test_a_shared_memory_freeze_frame_without_one_sealed_file_of_its_size_is_refused(
    manager: ThreadedManager, what: str
) -> None:
    from cwm_client.bulk import shm

    chunks = synthetic_chunks(TOKENS, seed=321)
    header = staging_header("shm-liar", chunks, IDS, f"up-shm-{what}")
    data = chunks[0].data()
    head = chunk_head(0, pb.ChunkCodec.CHUNK_CODEC_RAW, len(data), len(data))
    with grpc.insecure_channel(manager.target) as channel:
        offer = (
            pb.WindowServiceStub(channel)
            .OfferBulkFreeze(pb.OfferBulkFreezeRequest(header=header, bulk_transports=[SHM]))
            .offer
        )
        assert offer.transport == SHM
        sock = dial(manager, offer)
        sock.sendall(MAGIC + offer.ticket)
        if what == "no-file":
            sock.sendall(head)
        else:
            if what == "unsealed":
                fd = os.memfd_create("x")
                os.write(fd, data)
            elif what == "wrong-size":
                fd = shm.sealed_file(data[:-8])
            else:
                fd, write_end = os.pipe()
                os.close(write_end)
            socket.send_fds(sock, [head], [fd])
            os.close(fd)
        assert sock.recv(1) == shm.RESULT_MARK
        refusal = refusal_of(read_result(sock))
        sock.close()
    assert isinstance(refusal, InvalidArgument) and refusal.field == "chunk.data", refusal
    with WindowClient(manager.target) as client:
        assert "shm-liar" not in [w.name for w in client.list()]
    assert eventually(
        lambda: chunks[0].digest.hex() not in {p.name for p in chunk_files(manager.config.data_dir)}
    )


def test_an_offer_needs_an_upload_id_and_stage_only(manager: ThreadedManager) -> None:
    header = pb.FreezeHeader(
        name="x",
        fingerprint=FINGERPRINT,
        token_ids=IDS,
        chunk_tokens=256,
        chunk_digests=[c.digest for c in CHUNKS],
    )
    with grpc.insecure_channel(manager.target) as channel, pytest.raises(grpc.RpcError) as caught:
        pb.WindowServiceStub(channel).OfferBulkFreeze(
            pb.OfferBulkFreezeRequest(header=header, bulk_transports=[TCP])
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_an_unreachable_bulk_port_falls_back_to_grpc_and_a_forced_transport_says_so(
    tmp_path: Path,
) -> None:
    running = start(tmp_path, ServerOptions(bulk_unix=False))
    try:
        running.server.bulk.endpoints[TCP].close()  # as a firewall that refuses the port
        with WindowClient(running.target) as client:
            result = client.freeze("fb", CHUNKS, fingerprint=FINGERPRINT, token_ids=IDS)
            assert result.transport == "grpc" and result.chunks_sent == len(CHUNKS)
            with client.thaw("fb") as stream:
                assert stream.transport == "grpc"
                assert [bytes(c.data) for c in stream] == [c.data() for c in CHUNKS]
            with pytest.raises(Unavailable) as caught:
                client.thaw("fb", transport="tcp")
            assert caught.value.reason == "BULK_UNAVAILABLE"
            with pytest.raises(Unavailable):
                client.thaw("fb", transport="unix")  # this manager has no Unix socket
            with pytest.raises(Unavailable):
                client.freeze(
                    "fb2",
                    synthetic_chunks(512, seed=77),
                    fingerprint=FINGERPRINT,
                    token_ids=IDS[:512],
                    transport="tcp",
                )
            assert "fb2" not in [w.name for w in client.list()]
    finally:
        running.stop()


def test_bulk_off_offers_nothing(tmp_path: Path) -> None:
    running = start(tmp_path, ServerOptions(bulk_unix=False, bulk_listen="off"))
    try:
        assert running.server.bulk.endpoints == {}
        with WindowClient(running.target) as client:
            assert (
                client.freeze("off", CHUNKS, fingerprint=FINGERPRINT, token_ids=IDS).transport
                == "grpc"
            )
            with client.thaw("off") as stream:
                assert stream.transport == "grpc"
                assert [bytes(c.data) for c in stream] == [c.data() for c in CHUNKS]
    finally:
        running.stop()


# -- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


def test_tls_grpc_offers_only_tls_bulk_and_plaintext_gets_no_byte(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    cert, key = ca.server().write(tmp_path, "server")
    running = start(tmp_path, ServerOptions(tls_cert=cert, tls_key=key, bulk_unix=False))
    try:
        with WindowClient(running.target, root_certificates=ca.pem, timeout=20) as client:
            result = client.freeze("tls", CHUNKS, fingerprint=FINGERPRINT, token_ids=IDS)
            assert result.transport == "tcp"
            with client.thaw("tls") as stream:
                assert stream.transport == "tcp"
                assert [bytes(c.data) for c in stream] == [c.data() for c in CHUNKS]
        creds = grpc.ssl_channel_credentials(root_certificates=ca.pem)
        with grpc.secure_channel(running.target, creds) as channel:
            call = pb.WindowServiceStub(channel).Thaw(
                pb.ThawRequest(name="tls", bulk_transports=[TCP]), timeout=30
            )
            next(call)
            offer = next(call).bulk
            assert offer.tls
            plain = dial(running, offer)  # no TLS handshake: the hello is not even read
            plain.sendall(MAGIC + offer.ticket)
            assert nothing_comes(plain)
            call.cancel()
        assert refused(running, "no_hello") >= 1
    finally:
        running.stop()


def test_mtls_bulk_connection_certified_as_another_tenant_gets_no_byte(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    import ssl

    cert, key = ca.server().write(tmp_path, "server")
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.pem)
    options = ServerOptions(tls_cert=cert, tls_key=key, tls_client_ca=ca_file, bulk_unix=False)
    running = start(tmp_path, options)
    try:
        acme = ca.client("acme", "writer")
        with WindowClient(
            running.target,
            root_certificates=ca.pem,
            certificate_chain=acme.cert,
            private_key=acme.key,
            timeout=20,
        ) as client:
            assert (
                client.freeze("m", CHUNKS, fingerprint=FINGERPRINT, token_ids=IDS).transport
                == "tcp"
            )
            creds = grpc.ssl_channel_credentials(ca.pem, acme.key, acme.cert)
            with grpc.secure_channel(running.target, creds) as channel:
                call = pb.WindowServiceStub(channel).Thaw(
                    pb.ThawRequest(name="m", bulk_transports=[TCP]), timeout=30
                )
                next(call)
                offer = next(call).bulk
                other = ca.client("other", "writer")
                other_cert, other_key = other.write(tmp_path, "other")
                context = ssl.create_default_context(cadata=ca.pem.decode())
                context.load_cert_chain(str(other_cert), str(other_key))
                host, _, port = offer.address.rpartition(":")
                raw = socket.create_connection((host or "127.0.0.1", int(port)), timeout=10)
                sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
                sock.sendall(MAGIC + offer.ticket)
                assert nothing_comes(sock)
                call.cancel()
        assert refused(running, "tenant_mismatch") == 1
    finally:
        running.stop()


@pytest.mark.parametrize("transport", ["shm", "unix", "tcp", "auto"])
async def test_the_async_client_freezes_and_thaws_over_the_bulk_channel(
    manager: ThreadedManager, transport: str
) -> None:
    from cwm_client import AsyncWindowClient

    chunks = synthetic_chunks(TOKENS, seed=40 + ["unix", "tcp", "auto", "shm"].index(transport))
    async with AsyncWindowClient(manager.target) as client:
        result = await client.freeze(
            f"async-{transport}",
            chunks,
            fingerprint=FINGERPRINT,
            token_ids=IDS,
            transport=transport,
        )
        assert result.transport == ("unix" if transport == "auto" else transport)
        stream = await client.thaw(f"async-{transport}", transport=transport)
        async with stream:
            assert stream.transport == result.transport
            assert [bytes(c.data) async for c in stream] == [c.data() for c in chunks]


def test_the_health_report_names_the_bulk_endpoints(manager: ThreadedManager) -> None:
    condition = manager.server.health.conditions["cwm.bulk"]
    bulk = manager.server.bulk
    assert condition.detail == f"tcp {bulk.tcp_address}, unix {bulk.unix_path} (and shm)"
    assert bulk.tcp_address.startswith("127.0.0.1:") and bulk.unix_path.endswith("bulk.sock")


def test_a_hello_that_trickles_in_is_cut_off_without_a_byte(
    manager: ThreadedManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cwm_server.manager.bulk import listener

    monkeypatch.setattr(listener, "HELLO_TIMEOUT_S", 0.5)
    channel, call, _, offer = offered_thaw(manager, [TCP])
    with channel:
        slow = dial(manager, offer)
        hello = MAGIC + offer.ticket
        started = time.monotonic()
        try:
            for byte in hello[:8]:
                slow.sendall(bytes([byte]))
                time.sleep(0.1)
        except OSError:
            pass  # cut off while trickling: what this test wants
        assert nothing_comes(slow)
        assert time.monotonic() - started < 5
        call.cancel()


def test_a_bulk_port_that_drops_connections_falls_back_to_grpc_within_the_connect_timeout(
    tmp_path: Path,
) -> None:
    """A firewall that drops packets instead of refusing them: the client's connect gets no
    answer, and after `CONNECT_TIMEOUT_S` the same transfer goes on over gRPC."""
    from cwm_client.bulk import connection

    running = start(tmp_path, ServerOptions(bulk_unix=False))
    # A listening socket whose accept queue is full: the kernel drops further SYNs.
    black_hole = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(0)
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            filler.connect_ex(black_hole.getsockname())
            fillers.append(filler)
        time.sleep(0.2)
        running.server.bulk.tcp_address = f"127.0.0.1:{black_hole.getsockname()[1]}"
        chunks = synthetic_chunks(TOKENS, seed=61)
        with WindowClient(running.target, timeout=30) as client:
            started = time.monotonic()
            result = client.freeze("dropped", chunks, fingerprint=FINGERPRINT, token_ids=IDS)
            froze_s = time.monotonic() - started
            assert result.transport == "grpc" and result.chunks_sent == len(chunks)
            started = time.monotonic()
            with client.thaw("dropped") as stream:
                assert stream.transport == "grpc"
                assert [bytes(c.data) for c in stream] == [c.data() for c in chunks]
            thawed_s = time.monotonic() - started
        limit = connection.CONNECT_TIMEOUT_S + 3
        assert froze_s < limit and thawed_s < limit, (froze_s, thawed_s)
    finally:
        for filler in fillers:
            filler.close()
        black_hole.close()
        running.stop()
