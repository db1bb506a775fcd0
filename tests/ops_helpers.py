"""Helpers for the ecosystem tests: a manager with metrics and fast health checks, and
reading its health and metrics the way outside tools do."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from cwm_server.manager.config import ManagerConfig, ServerOptions
from cwm_server.manager.server import ManagerServer
from tests.helpers import ThreadedManager


class OpsManager(ThreadedManager):
    """A ThreadedManager with ServerOptions (metrics endpoint, health interval, ...)."""

    def __init__(self, data_dir: Path, options: ServerOptions) -> None:
        self.config = ManagerConfig(data_dir=data_dir, listen="127.0.0.1:0")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ManagerServer(self.config, options)
        self.port = self._run(self.server.start())
        self.target = f"127.0.0.1:{self.port}"

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return scrape(f"http://127.0.0.1:{self.server.metrics_port}/metrics")


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page as {(name, sorted labels): value}."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def health_status(target: str, service: str) -> tuple[str, dict[str, str]]:
    """Health/Check of one name: (status name, trailing metadata)."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response, call = stub.Check.with_call(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return status, dict(call.trailing_metadata() or ())


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.05)
