"""One agent per id: a second Connect with a live agent's id is refused with
ALREADY_EXISTS naming the holder; an agent silent past its keepalive is taken over, and
its stream ends so it knows."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cwm_client import pb
from cwm_server.manager import agents
from cwm_server.manager.config import ManagerConfig
from tests.helpers import FINGERPRINT, ThreadedManager


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[ThreadedManager]:
    running = ThreadedManager(
        ManagerConfig(data_dir=tmp_path / "data", listen="127.0.0.1:0", fsync=False)
    )
    yield running
    running.stop()


class Agent:
    """A bare Connect stream: the hello, then whatever `say` sends."""

    def __init__(self, target: str, agent_id: str, endpoint: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self._out: queue.Queue[pb.ConnectRequest | None] = queue.Queue()
        self._out.put(
            pb.ConnectRequest(
                hello=pb.AgentHello(agent_id=agent_id, fingerprint=FINGERPRINT, endpoint=endpoint)
            )
        )
        self.call = pb.SessionServiceStub(self.channel).Connect(
            iter(self._out.get, None), timeout=30
        )

    def welcome(self) -> pb.ConnectResponse:
        return next(self.call)

    def say(self) -> None:
        self._out.put(pb.ConnectRequest(sessions=pb.SessionReport()))

    def close(self) -> None:
        self._out.put(None)
        self.call.cancel()
        self.channel.close()


def agents_listed(manager: ThreadedManager) -> list[tuple[str, str]]:
    with grpc.insecure_channel(manager.target) as channel:
        listed = pb.SessionServiceStub(channel).ListAgents(pb.ListAgentsRequest())
    return [(a.agent_id, a.endpoint) for a in listed.agents]


def test_a_second_agent_with_a_live_agent_s_id_is_refused_naming_the_holder(
    manager: ThreadedManager,
) -> None:
    first = Agent(manager.target, "node-a", "http://first:8001")
    try:
        assert first.welcome().HasField("welcome")
        second = Agent(manager.target, "node-a", "http://second:8002")
        with pytest.raises(grpc.RpcError) as refused:
            second.welcome()
        second.close()
        assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "in use by the agent at http://first:8001" in refused.value.details()
        assert agents_listed(manager) == [("node-a", "http://first:8001")]
    finally:
        first.close()


def test_an_agent_silent_past_its_keepalive_is_taken_over_and_told(
    manager: ThreadedManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agents, "SILENT_AFTER_S", 0.5)
    talking = Agent(manager.target, "node-t", "http://talking:1")
    silent = Agent(manager.target, "node-s", "http://silent:1")
    try:
        talking.welcome()
        silent.welcome()
        stop = threading.Event()

        def keep_talking() -> None:
            while not stop.wait(0.1):
                talking.say()

        threading.Thread(target=keep_talking, daemon=True).start()
        time.sleep(1.0)
        again = Agent(manager.target, "node-t", "http://other:2")
        with pytest.raises(grpc.RpcError) as refused:
            again.welcome()  # the holder keeps reporting: it is live
        again.close()
        assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS

        taker = Agent(manager.target, "node-s", "http://taker:2")
        assert taker.welcome().HasField("welcome")
        with pytest.raises(grpc.RpcError) as ended:
            next(silent.call)  # the silent one's stream ends, saying why
        assert ended.value.code() == grpc.StatusCode.ABORTED
        assert "taken over" in ended.value.details()
        assert sorted(agents_listed(manager)) == [
            ("node-s", "http://taker:2"),
            ("node-t", "http://talking:1"),
        ]
        stop.set()
        taker.close()
    finally:
        talking.close()
        silent.close()
