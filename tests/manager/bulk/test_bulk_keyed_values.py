"""Keyed values (LMCache's remote tier) read over the bulk channel: the same values, in
the same order, verified against the digests the gRPC stream sent, with gRPC as the
fallback."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cwm_client import AsyncKeyedChunkClient, KeyedChunkClient, KeyedValue, pb
from cwm_client.bulk import shm
from cwm_client.bulk.frames import MAGIC
from cwm_client.errors import Unavailable
from cwm_server.manager.config import ManagerConfig, ServerOptions
from tests.helpers import ThreadedManager, eventually

SHM = pb.BulkTransport.BULK_TRANSPORT_SHM
VALUES = [
    KeyedValue(f"vllm@m@1@0@{i:016x}@bfloat16", os.urandom(70_000 + i), metadata=bytes([i]))
    for i in range(5)
]
KEYS = [VALUES[0].key, "absent-1", VALUES[1].key, VALUES[2].key, "absent-2", VALUES[3].key]
EXPECTED = [VALUES[0], None, VALUES[1], VALUES[2], None, VALUES[3]]


def start(root: Path, options: ServerOptions | None = None) -> ThreadedManager:
    config = ManagerConfig(data_dir=root / "data", listen="127.0.0.1:0", fsync=False)
    return ThreadedManager(config, options)


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedManager]:
    running = start(tmp_path_factory.mktemp("keyed-bulk"))
    with KeyedChunkClient(running.target) as client:
        client.put(VALUES)
    yield running
    running.stop()


def same(got: list[KeyedValue | None]) -> list[tuple[str, bytes, bytes] | None]:
    return [None if v is None else (v.key, bytes(v.data), v.metadata) for v in got]


def transferred(manager: ThreadedManager, transport: str) -> float:
    value = manager.server.metrics.registry.get_sample_value(
        "cwm_bulk_transfers_total", {"transport": transport, "direction": "thaw"}
    )
    return value or 0.0


@pytest.mark.parametrize("transport", ["grpc", "shm", "unix", "tcp", "auto"])
def test_keyed_values_read_over_each_transport_are_bit_identical_in_request_order(
    manager: ThreadedManager, transport: str
) -> None:
    carried = "unix" if transport == "auto" else transport  # these values are small
    before = transferred(manager, carried)
    with KeyedChunkClient(manager.target) as client:
        got = client.get(KEYS, transport=transport)
    assert same(got) == same(EXPECTED)
    if transport != "grpc":
        assert transferred(manager, carried) == before + 1
    assert eventually(lambda: not manager.manager.pins.held())


def test_only_missing_keys_need_no_connection(manager: ThreadedManager) -> None:
    with KeyedChunkClient(manager.target) as client:
        assert client.get(["absent-1", "absent-2"], transport="tcp") == [None, None]


async def test_the_async_client_reads_keyed_values_over_shared_memory(
    manager: ThreadedManager,
) -> None:
    async with AsyncKeyedChunkClient(manager.target) as client:
        got = await client.get(KEYS, transport="shm")
        assert same(got) == same(EXPECTED)
        assert all(isinstance(v.data, memoryview) for v in got if v is not None)
        assert same(await client.get(KEYS)) == same(EXPECTED)


def test_the_stream_lists_every_key_s_head_before_the_offer_and_no_bytes(
    manager: ThreadedManager,
) -> None:
    with grpc.insecure_channel(manager.target) as channel:
        call = pb.KeyedChunkServiceStub(channel).GetKeyedChunks(
            pb.GetKeyedChunksRequest(keys=KEYS, bulk_transports=[SHM]), timeout=30
        )
        messages = []
        for message in call:
            messages.append(message)
            if message.HasField("bulk"):
                break
        heads, offer = messages[:-1], messages[-1].bulk
        assert [m.part.key for m in heads] == KEYS
        assert [m.found for m in heads] == [v is not None for v in EXPECTED]
        assert all(not m.part.data for m in heads)
        assert offer.transport == SHM
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(offer.address)
        sock.sendall(MAGIC + offer.ticket)
        got = []
        for position, expected in enumerate(EXPECTED):
            if expected is None:
                continue
            head, fd = shm.receive_frame(sock)
            assert head.index == position and fd is not None
            with shm.closing(fd):
                got.append(bytes(shm.map_sealed(fd, head.length)))
            shm.acknowledge(sock)
        assert shm.receive_frame(sock)[0].is_end
        sock.close()
        assert list(call) == []
    assert got == [v.data for v in EXPECTED if v is not None]


def test_an_unreachable_bulk_port_falls_back_to_grpc_and_a_forced_transport_says_so(
    tmp_path: Path,
) -> None:
    running = start(tmp_path, ServerOptions(bulk_unix=False))
    try:
        with KeyedChunkClient(running.target) as client:
            client.put(VALUES)
            running.server.bulk.endpoints[pb.BulkTransport.BULK_TRANSPORT_TCP].close()
            assert same(client.get(KEYS)) == same(EXPECTED)
            with pytest.raises(Unavailable) as caught:
                client.get(KEYS, transport="tcp")
            assert caught.value.reason == "BULK_UNAVAILABLE"
        assert eventually(lambda: not running.manager.pins.held())
    finally:
        running.stop()
