"""llama.cpp inside the agent (`cwm agent --engine llamacpp`), end to end: two agents with
the tiny GGUF dialled into a real manager, a session built over the agent's OpenAI-style API,
frozen on one and thawed on the other, continued bit-identically without a prefill."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make llamacpp)")

from cwm_client import SessionClient
from cwm_server.agent.engines.base import EngineSettings
from cwm_server.agent.engines.factory import create_engine
from cwm_server.agent.engines.llamacpp.adapter import TINY_MODEL_FILE, LlamaCppAdapter
from cwm_server.agent.host_agent import HostAgent
from cwm_server.manager.config import ManagerConfig
from tests.helpers import ThreadedAgent, ThreadedManager
from tests.vllm_helpers import wait_reported

TEXT = "The keeper of the lighthouse wrote every storm into a ledger by the window. "


def _complete(endpoint: str, **body: Any) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{endpoint}/v1/completions",
        data=json.dumps({"temperature": 0, **body}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        answer: dict[str, Any] = json.loads(reply.read())
    return answer


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[SessionClient, LlamaCppAdapter, LlamaCppAdapter]]:
    manager = ThreadedManager(ManagerConfig(data_dir=tmp_path / "data", listen="127.0.0.1:0"))
    settings = EngineSettings(model="tiny", models_dir=tmp_path / "models")
    engines = [create_engine("llamacpp", settings) for _ in range(2)]
    assert (tmp_path / "models" / TINY_MODEL_FILE).is_file()  # built on first use
    agents = [
        ThreadedAgent(HostAgent(engine, manager.target, name))
        for engine, name in zip(engines, ("cpp-a", "cpp-b"), strict=True)
    ]
    for agent in agents:
        agent.wait_connected()
    sessions = SessionClient(manager.target)
    try:
        a, b = engines
        assert isinstance(a, LlamaCppAdapter) and isinstance(b, LlamaCppAdapter)
        yield sessions, a, b
    finally:
        sessions.close()
        for agent in agents:
            agent.stop()
        for engine in engines:
            engine.close()
        manager.stop()


def test_a_session_thawed_into_another_agent_continues_without_prefill(
    pair: tuple[SessionClient, LlamaCppAdapter, LlamaCppAdapter],
) -> None:
    sessions, a, b = pair
    first = _complete(a.endpoint, prompt=TEXT * 26, max_tokens=16, cache_salt="chat")
    assert first["usage"]["prompt_tokens"] > 700
    history = a.engine.tokenize(TEXT * 26) + first["choices"][0]["token_ids"][:-1]
    wait_reported(sessions, "cpp-a", "chat", len(history))
    sessions.freeze_session("chat", "chat-window", agent_id="cpp-a")
    thawed = sessions.thaw_window("chat-window", agent_id="cpp-b", new_session_id="chat-b")
    assert json.loads(thawed.request_fields) == {"cache_salt": "chat-b"}
    assert list(thawed.token_ids) == history

    follow = [*history, *a.engine.tokenize(" And then the lamp went out.")[1:]]
    on_a = _complete(a.endpoint, prompt=follow, max_tokens=16, cache_salt="chat")
    on_b = _complete(b.endpoint, prompt=follow, max_tokens=16, cache_salt="chat-b")
    assert on_b["choices"][0]["token_ids"] == on_a["choices"][0]["token_ids"]
    assert on_b["usage"]["prompt_tokens_details"]["cached_tokens"] == len(history)
