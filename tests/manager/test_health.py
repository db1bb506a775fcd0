"""gRPC standards: server reflection lists the API, the health service tells the truth.

Everything is read the way generic tools read it: the reflection client of grpcio-reflection
(what grpcurl does) and the standard grpc.health.v1 stubs (what grpc_health_probe and
Kubernetes do). The degraded and down states are real: a manager whose free-space floor is
above what the disk has, and a data dir whose chunk directory stops being writable.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from cwm_client import WindowClient
from cwm_client.errors import Unavailable
from cwm_server.manager.config import ServerOptions
from tests.helpers import FINGERPRINT, ROOT, ManagerProcess, synthetic_chunks, token_ids
from tests.ops_helpers import OpsManager, health_status, wait_for

SERVING = "SERVING"
NOT_SERVING = "NOT_SERVING"
SERVICES = ("", "cwm.v1.WindowService", "cwm.v1.SessionService")
COMPONENTS = ("cwm.catalog", "cwm.tier.disk", "cwm.tier.memory", "cwm.bulk")


def cwm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cwm_server.cli.main", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.fixture
def fast_manager(tmp_path: Path) -> Iterator[OpsManager]:
    """Health checks every 50 ms, so a change shows at once."""
    running = OpsManager(tmp_path / "data", ServerOptions(health_interval_s=0.05))
    yield running
    running.stop()


def test_reflection_lists_and_describes_the_services(fast_manager: OpsManager) -> None:
    with grpc.insecure_channel(fast_manager.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {
            "cwm.v1.WindowService",
            "cwm.v1.SessionService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= services
        # A generic tool can rebuild the whole contract from the server alone.
        pool = DescriptorPool(database)
        window_service = pool.FindServiceByName("cwm.v1.WindowService")
        methods = {m.name: m for m in window_service.methods}
        assert set(methods) >= {
            "Freeze",
            "Thaw",
            "FindMissingChunks",
            "ListWindows",
            "GetWindow",
            "CloneWindow",
            "DeleteWindow",
        }
        assert methods["Freeze"].input_type.full_name == "cwm.v1.FreezeRequest"
        header = pool.FindMessageTypeByName("cwm.v1.FreezeHeader")
        assert "chunk_digests" in header.fields_by_name
        session_service = pool.FindServiceByName("cwm.v1.SessionService")
        assert "ThawWindow" in {m.name for m in session_service.methods}


def test_health_serving_per_service_and_component(fast_manager: OpsManager) -> None:
    for name in (*SERVICES, *COMPONENTS):
        status, trailing = health_status(fast_manager.target, name)
        assert status == SERVING, name
        assert trailing["x-request-id"]
    _, trailing = health_status(fast_manager.target, "cwm.tier.disk")
    assert "MiB free" in trailing["cwm-health-detail"]
    with grpc.insecure_channel(fast_manager.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        listed = stub.List(health_pb2.HealthListRequest(), timeout=10)
        assert set(listed.statuses) == {*SERVICES, *COMPONENTS}
        with pytest.raises(grpc.RpcError) as caught:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def _break_chunk_dir(data_dir: Path) -> Path:
    """Make the disk tier unwritable for real, even for root: its directory becomes a file."""
    chunks = data_dir / "chunks"
    moved = data_dir / "chunks.moved"
    chunks.rename(moved)
    chunks.write_text("not a directory\n")
    return moved


def _repair_chunk_dir(data_dir: Path, moved: Path) -> None:
    (data_dir / "chunks").unlink()
    moved.rename(data_dir / "chunks")


def test_unwritable_disk_takes_the_services_down_and_back(fast_manager: OpsManager) -> None:
    target = fast_manager.target
    data_dir = fast_manager.config.data_dir
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(
            health_pb2.HealthCheckRequest(service="cwm.v1.WindowService"), timeout=60
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

        moved = _break_chunk_dir(data_dir)
        try:
            # The standard Watch stream reports the change as it happens.
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            for name in SERVICES:
                assert health_status(target, name)[0] == NOT_SERVING, name
            status, trailing = health_status(target, "cwm.tier.disk")
            assert status == NOT_SERVING
            assert "cannot write" in trailing["cwm-health-detail"]
            assert "cwm.tier.disk" in health_status(target, "")[1]["cwm-health-detail"]
            done = cwm("status", "--manager", target)
            assert done.returncode == 2, done.stdout + done.stderr
            assert "not serving" in done.stdout and "cannot write" in done.stdout
            # Freezing now fails as the server's condition (UNAVAILABLE, not INTERNAL),
            # and nothing is committed.
            with (
                WindowClient(target) as client,
                pytest.raises(Unavailable, match="cannot write") as refused,
            ):
                client.freeze(
                    "while-down",
                    synthetic_chunks(10),
                    fingerprint=FINGERPRINT,
                    token_ids=token_ids(10),
                )
            assert refused.value.reason == "DISK_UNWRITABLE"
        finally:
            _repair_chunk_dir(data_dir, moved)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
    wait_for(lambda: health_status(target, "cwm.tier.disk")[0] == SERVING, what="disk back")
    with WindowClient(target) as client:
        client.freeze(
            "after", synthetic_chunks(10), fingerprint=FINGERPRINT, token_ids=token_ids(10)
        )
        assert [w.name for w in client.list()] == ["after"]


def test_low_free_space_is_degraded_not_down(tmp_path: Path) -> None:
    """A manager whose free-space floor is above what its filesystem has left keeps serving
    (the overall and service statuses stay SERVING) and says its disk tier is degraded."""
    total = shutil.disk_usage(tmp_path).total
    floor_mib = str((total >> 20) * 2)
    manager = ManagerProcess(tmp_path / "data", ["--min-free-mib", floor_mib]).start()
    try:
        for name in SERVICES:
            assert health_status(manager.target, name)[0] == SERVING, name
        status, trailing = health_status(manager.target, "cwm.tier.disk")
        assert status == NOT_SERVING
        assert f"below min_free_mib {floor_mib}" in trailing["cwm-health-detail"]
        # Degraded still serves: a freeze and a thaw work.
        with WindowClient(manager.target) as client:
            chunks = synthetic_chunks(300)
            client.freeze("degraded-ok", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(300))
            with client.thaw("degraded-ok") as stream:
                assert [c.data for c in stream] == [c.data() for c in chunks]
        done = cwm("status", "--manager", manager.target)
        assert done.returncode == 0, done.stderr
        assert "degraded" in done.stdout
        assert "cwm.tier.disk" in done.stdout and "below min_free_mib" in done.stdout
        report = json.loads(cwm("status", "--json", "--manager", manager.target).stdout)
        assert report["state"] == "degraded"
        assert report["services"]["(overall)"] == SERVING
        assert report["components"]["cwm.tier.disk"]["status"] == NOT_SERVING
        assert report["agents"] == []
        # The log says why, as a JSON line.
        lines = [json.loads(line) for line in manager.log_path.read_text().splitlines()]
        assert any(
            line.get("event") == "health_changed"
            and line.get("component") == "cwm.tier.disk"
            and line.get("condition") == "DEGRADED"
            and line.get("level") == "warning"
            for line in lines
        )
    finally:
        manager.stop()


def test_status_of_an_unreachable_manager_fails_plainly(tmp_path: Path) -> None:
    from tests.helpers import free_port

    done = cwm("status", "--manager", f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert done.returncode == 1
    assert "did not answer" in done.stderr
