"""Windows across tensor-parallel sizes, end to end on vLLM's CPU build: a window frozen on a
one-worker vLLM thaws into a vLLM running the tiny Llama at tensor_parallel_size=2 (each of
its two workers holding one of the model's two KV heads) and the reverse, and what lands in
the target's paged cache, read back through every rank, is the window's bytes.

Runs only where vLLM is installed (`make test-vllm`). Both servers share the machine's two
cores; the TP=2 server binds one worker to each.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here (make test-vllm uses .venv-vllm)")

from cwm_client import SessionClient, WindowClient
from cwm_client.errors import DataLoss
from cwm_server.agent.engines.vllm import staging
from cwm_server.agent.engines.vllm.adapter import VllmAdapter
from cwm_server.agent.engines.vllm.launch import VllmServer
from cwm_server.agent.host_agent import HostAgent
from cwm_server.manager.config import ManagerConfig
from tests.helpers import ThreadedAgent, ThreadedManager, free_port
from tests.vllm_helpers import cached as _cached
from tests.vllm_helpers import complete_salted, wait_reported
from tests.vllm_helpers import prompt as _prompt
from tests.vllm_helpers import tokens_of as _tokens

BLOCK = 128
pytestmark = pytest.mark.timeout(900)


class TwoSizes:
    """A manager, vLLM `one` (one worker) and vLLM `two` (tensor_parallel_size=2), each
    with an agent."""

    def __init__(self, base: Path, model_dir: Path) -> None:
        self.manager = ThreadedManager(ManagerConfig(data_dir=base / "data", listen="127.0.0.1:0"))
        self.dir_one, self.dir_two = base / "cwm-one", base / "cwm-two"
        self.one = VllmServer(model_dir, free_port(), self.dir_one, base / "one.log", cpu="0")
        self.two = VllmServer(
            model_dir,
            free_port(),
            self.dir_two,
            base / "two.log",
            cpu="0|1",
            extra=["--tensor-parallel-size", "2"],
        )
        self.agents: list[ThreadedAgent] = []
        self.one.launch()
        self.two.launch()
        self.one.wait_ready()
        self.two.wait_ready()
        self.engine_one = VllmAdapter(self.one.url, self.dir_one)
        self.engine_two = VllmAdapter(self.two.url, self.dir_two)
        for engine, agent_id in ((self.engine_one, "one"), (self.engine_two, "two")):
            agent = ThreadedAgent(
                HostAgent(engine, self.manager.target, agent_id, chunk_tokens=256)
            )
            agent.wait_connected()
            self.agents.append(agent)
        self.sessions = SessionClient(self.manager.target)
        self.windows = WindowClient(self.manager.target)
        self.model = self.engine_one.model_name

    def complete(self, server: VllmServer, prompt: list[int], salt: str, **extra: Any) -> Any:
        return complete_salted(server.url, self.model, prompt, salt, **extra)

    def wait_reported(self, agent_id: str, session_id: str, tokens: int) -> None:
        wait_reported(self.sessions, agent_id, session_id, tokens)

    def digests(self, window: str) -> list[bytes]:
        return [chunk.digest for chunk in self.windows.get(window).chunks]

    def close(self) -> None:
        self.sessions.close()
        self.windows.close()
        for agent in self.agents:
            agent.stop()
        self.engine_one.close()
        self.engine_two.close()
        self.one.stop()
        self.two.stop()
        self.manager.stop()


@pytest.fixture(scope="module")
def sizes(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[TwoSizes]:
    running = TwoSizes(tmp_path_factory.mktemp("vllm-tp"), tiny_model_dir)
    try:
        yield running
    finally:
        running.close()


def test_the_tp2_server_reports_its_ranks_and_the_whole_models_heads(sizes: TwoSizes) -> None:
    info = sizes.engine_two.engine_info
    assert info["tensor_parallel_size"] == 2 and sizes.engine_two.ranks == 2
    assert info["num_kv_heads"] == 2  # the model's heads, not one rank's
    # One fingerprint for both: a window does not record how many ranks wrote it.
    assert sizes.engine_two.fingerprint == sizes.engine_one.fingerprint


@pytest.mark.parametrize(("source", "target"), [("one", "two"), ("two", "one")])
def test_a_window_thaws_across_tensor_parallel_sizes_with_the_same_bytes(
    sizes: TwoSizes, source: str, target: str
) -> None:
    servers = {"one": sizes.one, "two": sizes.two}
    context = _prompt(10 + len(source), 700)
    salt = f"tp-{source}"
    first = sizes.complete(servers[source], context, salt, max_tokens=16)
    history = context + _tokens(first)
    tokens = (len(history) - 1) // BLOCK * BLOCK
    sizes.wait_reported(source, salt, tokens)

    frozen = sizes.sessions.freeze_session(salt, f"w-{source}", agent_id=source)
    assert frozen.window.token_count == tokens == 640
    original = sizes.digests(f"w-{source}")
    assert len(original) == 3
    thawed = f"{salt}-on-{target}"
    sizes.sessions.thaw_window(f"w-{source}", agent_id=target, new_session_id=thawed)
    sizes.wait_reported(target, thawed, tokens)

    # The target's cache, read back through all its ranks, holds the window bit for bit.
    back = sizes.sessions.freeze_session(thawed, f"w-{source}-back", agent_id=target)
    assert back.window.token_count == tokens
    assert sizes.digests(f"w-{source}-back") == original

    continuation = history + _prompt(3, 40)
    on_source = sizes.complete(servers[source], continuation, salt, max_tokens=16)
    on_target = sizes.complete(servers[target], continuation, thawed, max_tokens=16)
    assert _cached(on_source) == tokens
    assert _cached(on_target) == tokens  # no prefill of the window on the target
    assert len(_tokens(on_target)) == 16


def test_a_damaged_chunk_is_refused_by_every_rank(sizes: TwoSizes) -> None:
    """At TP=2 both ranks check the whole chunk before scattering their heads: neither uses
    the damaged one, and the agent reports the load's loss once, naming both ranks."""
    context = _prompt(30, 700)
    first = sizes.complete(sizes.one, context, "tp-damaged", max_tokens=16)
    history = context + _tokens(first)
    tokens = (len(history) - 1) // BLOCK * BLOCK
    sizes.wait_reported("one", "tp-damaged", tokens)
    sizes.sessions.freeze_session("tp-damaged", "w-damaged", agent_id="one")
    with sizes.windows.thaw("w-damaged") as stream:
        datas = [chunk.data for chunk in stream]

    engine = sizes.engine_two
    staged = engine.begin_import("tp-damaged-2", history[:tokens], 256)
    for index, data in enumerate(datas):
        staged.add_chunk(index, data)
    staged.stage()
    damaged = staged.chunk_dir / staging.chunk_file_name(2)
    raw = bytearray(damaged.read_bytes())
    raw[-1] ^= 0x01  # the last byte: the second head's, which rank 1 holds
    damaged.write_bytes(bytes(raw))
    try:
        engine._submit_load(history[: tokens + 1], "tp-damaged-2", staged.op_id)
        with pytest.raises(DataLoss) as lost:
            engine._check_load(staged.directory, "tp-damaged-2")
        assert "rank 0" in lost.value.message and "rank 1" in lost.value.message
        for rank in (0, 1):
            result = json.loads(staging.result_path(staged.directory, rank).read_text())
            assert result["loaded_blocks"] == 4  # chunks 0 and 1; chunk 2 on neither rank
            assert "BLAKE3" in result["error"]
    finally:
        staged.abort()
