"""Garbage on the bulk ports of a real `cwm serve`: hundreds of bad connections and lying
frames behind valid tickets leave the manager serving, its memory where it was, and
nothing stored."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import grpc

from cwm_client import WindowClient, pb
from cwm_client.bulk.frames import MAGIC, chunk_head
from tests.helpers import (
    FINGERPRINT,
    ManagerProcess,
    chunk_files,
    staging_header,
    synthetic_chunks,
    token_ids,
)

TOKENS = 256 * 8


def _bulk_addresses(proc: ManagerProcess) -> tuple[str, tuple[str, int]]:
    with grpc.insecure_channel(proc.target) as channel:
        call = pb.WindowServiceStub(channel).Thaw(
            pb.ThawRequest(name="w", bulk_transports=[pb.BulkTransport.BULK_TRANSPORT_TCP]),
            timeout=30,
        )
        next(call)
        tcp = next(call).bulk.address
        call.cancel()
    host, _, port = tcp.rpartition(":")
    return str(proc.data_dir / "bulk.sock"), (host or "127.0.0.1", int(port))


def test_garbage_on_the_bulk_ports_never_hurts_the_manager(tmp_path: Path) -> None:
    proc = ManagerProcess(tmp_path / "data", ["--no-fsync", "--log-level", "WARNING"]).start()
    rng = random.Random(7)
    try:
        chunks = synthetic_chunks(TOKENS, seed=8)
        ids = token_ids(TOKENS)
        with WindowClient(proc.target, timeout=30) as client:
            client.freeze("w", chunks, fingerprint=FINGERPRINT, token_ids=ids)
        unix_path, tcp = _bulk_addresses(proc)
        before = proc.rss_bytes()
        for i in range(300):
            if i % 2:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(unix_path)
            else:
                sock = socket.create_connection(tcp)
            sock.settimeout(10)
            size = rng.choice([0, 1, 7, 39, 40, 41, 1000, 70000])
            payload = os.urandom(size) if i % 3 else MAGIC + os.urandom(max(0, size - 8))
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                assert sock.recv(1) == b""
            except OSError:  # closed by the manager while sending: refused, as wanted
                pass
            finally:
                sock.close()
        # lying frames behind valid freeze tickets
        fresh = synthetic_chunks(TOKENS, seed=9)
        header = staging_header("liar", fresh, ids, "up-fuzz-00001")
        with grpc.insecure_channel(proc.target) as channel:
            stub = pb.WindowServiceStub(channel)
            for _ in range(40):
                offer = stub.OfferBulkFreeze(
                    pb.OfferBulkFreezeRequest(
                        header=header, bulk_transports=[pb.BulkTransport.BULK_TRANSPORT_TCP]
                    ),
                    timeout=30,
                ).offer
                sock = socket.create_connection(tcp, timeout=10)
                head = chunk_head(
                    rng.randrange(0, 12),
                    rng.randrange(0, 8),
                    rng.choice([fresh[0].raw_size, 1 << 62, 0]),
                    rng.choice([1 << 61, fresh[0].raw_size, 3]),
                )
                try:
                    sock.sendall(MAGIC + offer.ticket + head + os.urandom(rng.randrange(0, 4096)))
                    sock.shutdown(socket.SHUT_WR)
                    while sock.recv(65536):
                        pass
                except OSError:  # closed by the manager while sending: refused, as wanted
                    pass
                finally:
                    sock.close()
        after = proc.rss_bytes()
        assert after - before < 32 << 20, (before, after)
        with WindowClient(proc.target, timeout=30) as client:
            assert [w.name for w in client.list()] == ["w"]
            with client.thaw("w") as stream:
                assert stream.transport == "unix"
                assert [bytes(c.data) for c in stream] == [c.data() for c in chunks]
        names = {p.name for p in chunk_files(tmp_path / "data")}
        assert not names & {c.digest.hex() for c in fresh}
    finally:
        proc.stop()
