from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cwm_client import WindowClient
from cwm_server.agent.engines.reference.tiny_model import ensure_tiny_model
from cwm_server.manager.config import ManagerConfig
from tests.helpers import ThreadedManager


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[ThreadedManager]:
    """A real manager on an ephemeral loopback port, with a fresh data dir."""
    running = ThreadedManager(ManagerConfig(data_dir=tmp_path / "data", listen="127.0.0.1:0"))
    yield running
    running.stop()


@pytest.fixture
def client(manager: ThreadedManager) -> Iterator[WindowClient]:
    with WindowClient(manager.target) as window_client:
        yield window_client


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in random-weight Llama, built once per test run (about 10 s)."""
    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Any]:
    """A fresh redis-server on a free loopback port (tests.redis_helpers.RedisServer).

    Imported here, not at the top: the protobuf-6, vLLM and LMCache environments run
    tests from this directory without redis-py."""
    from tests.redis_helpers import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()
