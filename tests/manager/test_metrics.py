"""Prometheus metrics: after a freeze and a thaw, /metrics counts exactly the bytes moved.

"Chunk bytes" are the bytes of `Chunk.data` in every part that crossed the wire; "chunks"
are counted at their first part. The test moves them through the raw generated stub and
counts them on the client side, so both ends of the wire are compared.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cwm_client import WindowClient, pb
from cwm_client._common import build_header, freeze_requests
from cwm_server.manager.config import ServerOptions
from tests.helpers import FINGERPRINT, ManagerProcess, free_port, synthetic_chunks, token_ids
from tests.ops_helpers import OpsManager, scrape

FREEZE = "cwm.v1.WindowService/Freeze"
THAW = "cwm.v1.WindowService/Thaw"
GET = "cwm.v1.WindowService/GetWindow"
TOKENS = 256 * 3 + 100  # three full 512 KiB chunks and a short one


@pytest.fixture
def metered(tmp_path: Path) -> Iterator[OpsManager]:
    running = OpsManager(tmp_path / "data", ServerOptions(metrics_listen="127.0.0.1:0"))
    yield running
    running.stop()


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_byte_counters_equal_the_bytes_moved(metered: OpsManager) -> None:
    chunks = synthetic_chunks(TOKENS, seed=3)
    ids = token_ids(TOKENS, seed=3)
    header = build_header("metered", chunks, fingerprint=FINGERPRINT, token_ids=ids)
    requests = list(freeze_requests(header, chunks, part_bytes=200 * 1024))
    sent_bytes = sum(len(r.chunk.data) for r in requests if r.HasField("chunk"))
    sent_parts = sum(1 for r in requests if r.HasField("chunk"))
    assert sent_parts > len(chunks)  # chunks travelled in several parts
    before = metered.scrape()

    with grpc.insecure_channel(metered.target) as channel:
        stub = pb.WindowServiceStub(channel)
        frozen = stub.Freeze(iter(requests), timeout=60)
        received_bytes = 0
        received_chunks = 0
        for message in stub.Thaw(pb.ThawRequest(name="metered", max_part_bytes=128 * 1024)):
            if message.HasField("chunk"):
                received_bytes += len(message.chunk.data)
                received_chunks += message.chunk.data_offset == 0
        with pytest.raises(grpc.RpcError):
            stub.GetWindow(pb.GetWindowRequest(name="absent"))

    after = metered.scrape()
    raw_bytes = sum(c.raw_size for c in chunks)
    assert sent_bytes == raw_bytes == frozen.bytes_received == frozen.window.raw_bytes
    assert received_bytes == raw_bytes and received_chunks == len(chunks)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # Per RPC: chunk bytes and chunks in and out, equal to what crossed the wire.
    assert delta("cwm_rpc_received_chunk_bytes_total", method=FREEZE) == sent_bytes
    assert delta("cwm_rpc_received_chunks_total", method=FREEZE) == len(chunks)
    assert delta("cwm_rpc_sent_chunk_bytes_total", method=THAW) == received_bytes
    assert delta("cwm_rpc_sent_chunks_total", method=THAW) == len(chunks)
    assert delta("cwm_rpc_sent_chunk_bytes_total", method=FREEZE) == 0
    assert delta("cwm_rpc_received_chunk_bytes_total", method=THAW) == 0
    # Messages and their serialized bytes.
    assert delta("cwm_rpc_received_messages_total", method=FREEZE) == len(requests)
    assert delta("cwm_rpc_received_message_bytes_total", method=FREEZE) == sum(
        r.ByteSize() for r in requests
    )
    assert delta("cwm_rpc_sent_message_bytes_total", method=FREEZE) == frozen.ByteSize()

    # Stream durations, by method and status; nothing left in flight.
    assert delta("cwm_rpc_duration_seconds_count", method=FREEZE, code="OK") == 1
    assert delta("cwm_rpc_duration_seconds_count", method=THAW, code="OK") == 1
    assert delta("cwm_rpc_duration_seconds_count", method=GET, code="NOT_FOUND") == 1
    assert delta("cwm_rpc_duration_seconds_sum", method=FREEZE, code="OK") > 0
    assert value(after, "cwm_streams_in_flight", method=FREEZE) == 0
    assert value(after, "cwm_streams_in_flight", method=THAW) == 0

    # The store: one verification per chunk each way, one durable write per chunk, and the
    # thaw served from the memory tier.
    assert delta("cwm_chunk_verify_seconds_count", op="store") == len(chunks)
    assert delta("cwm_chunk_verify_seconds_count", op="load") == len(chunks)
    assert delta("cwm_chunk_store_seconds_count") == len(chunks)
    assert delta("cwm_tier_hits_total", tier="memory") == len(chunks)
    assert delta("cwm_chunk_load_seconds_count", tier="memory") == len(chunks)
    assert value(after, "cwm_tier_bytes", tier="memory") == raw_bytes
    assert value(after, "cwm_tier_capacity_bytes", tier="memory") == 256 << 20
    assert ("cwm_tier_corrupt_dropped_total", (("tier", "memory"),)) in after
    assert value(after, "cwm_tier_corrupt_dropped_total", tier="memory") == 0

    # The catalog per tenant, and the disk tier's bytes.
    window = frozen.window
    assert value(after, "cwm_windows", tenant="default") == 1
    assert value(after, "cwm_tenant_chunks", tenant="default") == len(chunks)
    assert value(after, "cwm_tenant_raw_bytes", tenant="default") == raw_bytes
    assert value(after, "cwm_tenant_stored_bytes", tenant="default") == window.stored_bytes
    assert value(after, "cwm_tier_bytes", tier="disk") == window.stored_bytes
    assert value(after, "cwm_agents_connected") == 0
    assert value(after, "cwm_health_level", component="cwm.tier.disk") == 0


def test_misses_and_disk_reads_after_a_restart(tmp_path: Path) -> None:
    """A fresh manager has nothing in memory: the thaw misses there and reads the disk."""
    data = tmp_path / "data"
    first = OpsManager(data, ServerOptions(metrics_listen="127.0.0.1:0"))
    chunks = synthetic_chunks(600, seed=5)
    with WindowClient(first.target) as client:
        client.freeze("cold", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(600))
        client.clone("cold", "cold-clone")
    first.stop()
    second = OpsManager(data, ServerOptions(metrics_listen="127.0.0.1:0"))
    try:
        with WindowClient(second.target) as client, client.thaw("cold") as stream:
            assert len(list(stream)) == len(chunks)
        samples = second.scrape()
        assert value(samples, "cwm_tier_misses_total", tier="memory") == len(chunks)
        assert value(samples, "cwm_tier_hits_total", tier="disk") == len(chunks)
        assert value(samples, "cwm_chunk_load_seconds_count", tier="disk") == len(chunks)
        # A clone adds a window, not bytes.
        assert value(samples, "cwm_windows", tenant="default") == 2
        assert value(samples, "cwm_tenant_chunks", tenant="default") == len(chunks)
    finally:
        second.stop()


def test_serve_metrics_flag_and_request_ids_in_json_logs(tmp_path: Path) -> None:
    """`cwm serve --metrics HOST:PORT` as a process; its JSON log lines carry the request id
    a client sent, and the id comes back in the trailing metadata, on errors too."""
    port = free_port()
    manager = ManagerProcess(tmp_path / "data", ["--metrics", f"127.0.0.1:{port}"]).start()
    try:
        with grpc.insecure_channel(manager.target) as channel:
            stub = pb.WindowServiceStub(channel)
            _, call = stub.ListWindows.with_call(
                pb.ListWindowsRequest(), metadata=[("x-request-id", "list-42")], timeout=10
            )
            assert dict(call.trailing_metadata())["x-request-id"] == "list-42"
            with pytest.raises(grpc.RpcError) as caught:
                stub.GetWindow(
                    pb.GetWindowRequest(name="nope"),
                    metadata=[("x-request-id", "get-43")],
                    timeout=10,
                )
            trailing = dict(caught.value.trailing_metadata())
            assert trailing["x-request-id"] == "get-43"
            assert "grpc-status-details-bin" in trailing
            # Without one the manager makes one up, and still returns it.
            _, call = stub.ListWindows.with_call(pb.ListWindowsRequest(), timeout=10)
            generated = dict(call.trailing_metadata())["x-request-id"]
            assert len(generated) == 32
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
        assert value(samples, "cwm_rpc_duration_seconds_count", method=GET, code="NOT_FOUND") == 1
        manager.stop()
        lines = [json.loads(line) for line in manager.log_path.read_text().splitlines()]
        by_id = {line.get("request_id"): line for line in lines if line.get("event") == "rpc"}
        assert by_id["list-42"]["code"] == "OK"
        assert by_id["get-43"]["code"] == "NOT_FOUND"
        assert by_id["get-43"]["method"] == "/" + GET
        assert generated in by_id
        assert all(line["level"] and line["timestamp"] for line in lines)
    finally:
        manager.stop()
