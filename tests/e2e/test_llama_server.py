"""llama-server's slots as cwm sessions, end to end: unmodified llama-server processes (the
binary `make llamacpp` builds) running the tiny GGUF, agents beside them dialled into a real
manager, sessions frozen on one server and thawed into a freshly started one.

The KV is checked, not only the tokens: the slot B holds after the thaw, saved and parsed
back, equals A's canonical chunks byte for byte, and the continuation's 16 greedy tokens and
their top-10 probabilities (`n_probs`) equal those of A's uninterrupted session.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cwm_client import SessionClient, WindowClient
from cwm_client.errors import (
    Aborted,
    AlreadyExists,
    CwmError,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
)
from cwm_server.agent.engines.llamacpp.launch import LlamaServer, completion, server_binary
from cwm_server.agent.engines.llamacpp.server_adapter import LOCK_FILE, LlamaServerAdapter
from cwm_server.agent.engines.llamacpp.tiny_gguf import RECIPE, ensure_tiny_gguf
from cwm_server.agent.host_agent import HostAgent
from cwm_server.manager.config import ManagerConfig
from tests.helpers import ROOT, ThreadedAgent, ThreadedManager, fill_disk, free_port, mounted_tmpfs
from tests.ops_helpers import wait_for
from tests.vllm_helpers import wait_reported

if not server_binary().exists():
    pytest.skip(
        f"no llama-server at {server_binary()} (make llamacpp builds it)", allow_module_level=True
    )

pytestmark = pytest.mark.timeout(600)
TEXT = "The keeper of the lighthouse wrote every storm into a ledger by the window. "
CHUNK_TOKENS = 256


def _post(url: str, path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        f"{url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())


def _tokens(url: str, text: str, bos: bool = True) -> list[int]:
    tokens: list[int] = _post(url, "/tokenize", {"content": text, "add_special": bos})["tokens"]
    return tokens


def _own_files(slot_dir: Path) -> list[str]:
    return sorted(p.name for p in slot_dir.iterdir() if p.name != LOCK_FILE)


class Fleet:
    """A manager (no memory tier, no compression: what is on disk is what is served), and
    llama-server processes with agents, started on demand and stopped together."""

    def __init__(self, base: Path) -> None:
        self.base = base
        config = ManagerConfig(
            data_dir=base / "data", listen="127.0.0.1:0", memory_cache_bytes=0, compress=False
        )
        self.manager = ThreadedManager(config)
        self.sessions = SessionClient(self.manager.target)
        self.windows = WindowClient(self.manager.target)
        self.servers: dict[str, LlamaServer] = {}
        self.engines: dict[str, LlamaServerAdapter] = {}
        self.agents: dict[str, ThreadedAgent] = {}

    def server(
        self, name: str, model: Path, flash_attn: bool = True, **options: Any
    ) -> LlamaServer:
        server = LlamaServer(
            model,
            free_port(),
            self.base / f"slots-{name}",
            self.base / f"llama-{name}.log",
            flash_attn=flash_attn,
            threads=1,
            **options,
        )
        self.servers[name] = server
        server.launch()
        server.wait_ready()
        return server

    def agent(self, name: str) -> LlamaServerAdapter:
        server = self.servers[name]
        engine = LlamaServerAdapter(server.url, server.slot_dir)
        self.engines[name] = engine
        agent = ThreadedAgent(
            HostAgent(engine, self.manager.target, f"llama-{name}", chunk_tokens=CHUNK_TOKENS)
        )
        agent.wait_connected()
        self.agents[name] = agent
        return engine

    def close(self) -> None:
        self.sessions.close()
        self.windows.close()
        for agent in self.agents.values():
            agent.stop()
        for engine in self.engines.values():
            engine.close()
        for server in self.servers.values():
            server.stop()
        self.manager.stop()


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    running = Fleet(tmp_path_factory.mktemp("llama"))
    try:
        yield running
    finally:
        running.close()


def _session_on(fleet: Fleet, name: str, slot: int, words: int = 26) -> list[int]:
    """A 700+ token session with 16 generated tokens in `slot` of server `name`; the tokens
    whose KV the slot holds (the last generated token has none yet)."""
    url = fleet.servers[name].url
    prompt = _tokens(url, TEXT * words)
    first = completion(url, prompt, slot, n_predict=16)
    history = prompt + first["tokens"][:-1]
    wait_reported(fleet.sessions, f"llama-{name}", f"slot-{slot}", len(history))
    return history


@pytest.mark.parametrize("flash_attn", [True, False], ids=["flash-attn", "v-transposed"])
def test_a_slot_frozen_on_one_server_continues_bit_identically_on_a_fresh_one(
    fleet: Fleet, gguf: Path, flash_attn: bool
) -> None:
    a, b = f"a-{flash_attn}", f"b-{flash_attn}"
    fleet.server(a, gguf, flash_attn)
    fleet.agent(a)
    history = _session_on(fleet, a, 0)
    assert len(history) > 700
    window = f"lighthouse-{flash_attn}"
    frozen = fleet.sessions.freeze_session("slot-0", window, agent_id=f"llama-{a}")
    assert frozen.window.token_count == len(history)

    fleet.server(b, gguf, flash_attn)  # started after the freeze: nothing in it yet
    engine_b = fleet.agent(b)
    thawed = fleet.sessions.thaw_window(window, agent_id=f"llama-{b}")
    assert thawed.session_id == "slot-0"
    assert json.loads(thawed.request_fields) == {"id_slot": 0, "cache_prompt": True}
    assert list(thawed.token_ids) == history
    assert _own_files(fleet.servers[b].slot_dir) == []  # the staged file is gone

    # The bytes, not only the tokens: B's slot, saved and parsed, is A's window.
    with fleet.windows.thaw(window) as stream:
        stored = [chunk.data for chunk in stream]
    assert engine_b.export_session("slot-0", CHUNK_TOKENS).chunks == stored

    follow = history + _tokens(fleet.servers[a].url, " And then the lamp went out.", bos=False)
    on_a = completion(fleet.servers[a].url, follow, 0, n_predict=16, n_probs=10)
    on_b = completion(fleet.servers[b].url, follow, 0, n_predict=16, n_probs=10)
    assert on_b["tokens"] == on_a["tokens"]
    assert on_b["completion_probabilities"] == on_a["completion_probabilities"]
    assert on_b["timings"]["cache_n"] == len(history)  # no prefill of the frozen tokens
    assert on_b["timings"]["prompt_n"] == len(follow) - len(history)

    # The grown session freezes incrementally: its first chunks are already stored.
    wait_reported(fleet.sessions, f"llama-{b}", "slot-0", len(follow) + 15)
    again = fleet.sessions.freeze_session("slot-0", f"{window}-2", agent_id=f"llama-{b}")
    assert again.chunks_reused == len(history) // CHUNK_TOKENS


def test_a_window_thaws_into_servers_whose_slots_share_one_cache_or_are_more(
    fleet: Fleet, gguf: Path
) -> None:
    """The stream count (one per slot, or one shared: --kv-unified) is the target's own; the
    continuation is the same bits either way."""
    fleet.server("s-src", gguf)
    fleet.agent("s-src")
    history = _session_on(fleet, "s-src", 0)
    fleet.sessions.freeze_session("slot-0", "streams", agent_id="llama-s-src")
    follow = [*history, 300, 301, 302]
    expected = completion(fleet.servers["s-src"].url, follow, 0, n_predict=16, n_probs=10)
    for name, options in (("unified", {"extra": ["--kv-unified"]}), ("four", {"slots": 4})):
        fleet.server(name, gguf, **options)
        fleet.agent(name)
        thawed = fleet.sessions.thaw_window(
            "streams", agent_id=f"llama-{name}", new_session_id="slot-1"
        )
        assert thawed.session_id == "slot-1"
        got = completion(fleet.servers[name].url, follow, 1, n_predict=16, n_probs=10)
        assert got["tokens"] == expected["tokens"]
        assert got["completion_probabilities"] == expected["completion_probabilities"]
        assert got["timings"]["cache_n"] == len(history)
    assert fleet.engines["unified"].layout.n_stream == 1
    assert fleet.engines["four"].layout.n_stream == 4


def test_a_window_of_another_model_or_v_layout_is_refused_before_anything_is_staged(
    fleet: Fleet, gguf: Path, tmp_path: Path
) -> None:
    fleet.server("src", gguf)
    fleet.agent("src")
    _session_on(fleet, "src", 0, words=4)
    fleet.sessions.freeze_session("slot-0", "src-window", agent_id="llama-src")
    other = ensure_tiny_gguf(tmp_path / "other.gguf", recipe={**RECIPE, "seed": RECIPE["seed"] + 1})
    fleet.server("other-model", other)
    fleet.agent("other-model")
    fleet.server("other-layout", gguf, flash_attn=False)
    fleet.agent("other-layout")
    for name, field in (("other-model", "weights_digest"), ("other-layout", "v_trans 0")):
        with pytest.raises(FailedPrecondition) as refused:
            fleet.sessions.thaw_window("src-window", agent_id=f"llama-{name}")
        assert field in refused.value.message
        assert _own_files(fleet.servers[name].slot_dir) == []
        assert fleet.engines[name].sessions() == []


def test_a_damaged_chunk_fails_the_thaw_and_never_reaches_the_slot(
    fleet: Fleet, gguf: Path
) -> None:
    fleet.server("d-src", gguf)
    fleet.agent("d-src")
    _session_on(fleet, "d-src", 0)
    fleet.sessions.freeze_session("slot-0", "to-damage", agent_id="llama-d-src")
    fleet.server("d-dst", gguf)
    engine = fleet.agent("d-dst")
    kept = _session_on(fleet, "d-dst", 1, words=3)  # a session B already holds, untouched

    digest = fleet.windows.get("to-damage").chunks[1].digest.hex()
    path = fleet.base / "data" / "chunks" / "default" / digest[:2] / digest
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0x01
    path.write_bytes(bytes(damaged))
    try:
        with pytest.raises(DataLoss):
            fleet.sessions.thaw_window("to-damage", agent_id="llama-d-dst")
    finally:
        path.write_bytes(original)
    assert [(s.session_id, s.token_count) for s in engine.sessions()] == [("slot-1", len(kept))]
    assert _own_files(fleet.servers["d-dst"].slot_dir) == []
    # The window, mended, thaws into the slot the failed thaw would have used.
    assert fleet.sessions.thaw_window("to-damage", agent_id="llama-d-dst").session_id == "slot-0"


def test_a_second_agent_on_the_same_slot_directory_is_refused(fleet: Fleet, gguf: Path) -> None:
    server = fleet.server("twice", gguf)
    fleet.agent("twice")
    with pytest.raises(FailedPrecondition) as refused:
        LlamaServerAdapter(server.url, server.slot_dir)
    assert refused.value.reason == "SLOT_DIR_IN_USE"
    command = ["agent", "--engine", "llama-server", "--llama-url", server.url]
    command += ["--slot-dir", str(server.slot_dir), "--agent-id", "x"]
    started = subprocess.run(
        [sys.executable, "-m", "cwm_server.cli.main", *command],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert started.returncode == 1
    assert "another cwm agent already serves" in started.stderr
    assert "Traceback" not in started.stderr


def test_a_thaw_into_a_slot_that_does_not_exist_is_refused(fleet: Fleet, gguf: Path) -> None:
    fleet.server("names", gguf)
    fleet.agent("names")
    _session_on(fleet, "names", 0, words=3)
    fleet.sessions.freeze_session("slot-0", "names-window", agent_id="llama-names")
    for bad in ("slot-2", "slot-01", "chat-1"):
        with pytest.raises(InvalidArgument) as refused:
            fleet.sessions.thaw_window("names-window", agent_id="llama-names", new_session_id=bad)
        assert refused.value.field == "new_session_id"
    with pytest.raises(AlreadyExists):
        fleet.sessions.thaw_window("names-window", agent_id="llama-names", new_session_id="slot-0")
    assert _own_files(fleet.servers["names"].slot_dir) == []


def _agent_process(fleet: Fleet, name: str, log: Path) -> subprocess.Popen[bytes]:
    args = fleet.servers[name].agent_args(f"llama-{name}", fleet.manager.target)
    command = [sys.executable, "-m", "cwm_server.cli.main", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)


def test_killing_the_agent_mid_thaw_leaves_the_server_serving_correctly(
    fleet: Fleet, gguf: Path
) -> None:
    fleet.server("k-src", gguf)
    fleet.agent("k-src")
    history = _session_on(fleet, "k-src", 0, words=110)  # ~3k tokens, ~3 MiB of KV
    fleet.sessions.freeze_session("slot-0", "to-kill", agent_id="llama-k-src")
    server = fleet.server("k-dst", gguf)
    follow = [*history, 300, 301, 302]
    source = fleet.servers["k-src"].url
    continued = completion(source, follow, 0, n_predict=8)["tokens"]  # the frozen KV reused
    recomputed = completion(source, follow, 1, n_predict=8)["tokens"]  # an empty slot
    log = fleet.base / "agent-k.log"
    for delay in (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1):
        agent = _agent_process(fleet, "k-dst", log)
        wait_for(
            lambda: any(a.agent_id == "llama-k-dst" for a in fleet.sessions.list_agents()),
            timeout=60,
            what="the agent to connect",
        )
        thread = threading.Thread(target=_thaw_or_error, args=(fleet, "to-kill", "llama-k-dst"))
        thread.start()
        time.sleep(delay)
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        thread.join(60)
        # Every slot is empty or holds the whole window; the server answers as it should.
        for slot in (0, 1):
            answer = completion(server.url, follow, slot, n_predict=8)
            if answer["timings"]["cache_n"] == len(history):
                assert answer["tokens"] == continued
            else:
                assert answer["timings"]["cache_n"] == 0
                assert answer["tokens"] == recomputed
            _post(server.url, f"/slots/{slot}?action=erase", {})
        wait_for(
            lambda: all(a.agent_id != "llama-k-dst" for a in fleet.sessions.list_agents()),
            timeout=60,
            what="the killed agent to be dropped",
        )
    # A new agent removes what the killed ones left in the slot directory, and thaws.
    engine = LlamaServerAdapter(server.url, server.slot_dir)
    try:
        assert _own_files(server.slot_dir) == []
    finally:
        engine.close()
    fleet.agent("k-dst")
    assert fleet.sessions.thaw_window("to-kill", agent_id="llama-k-dst").token_count == len(history)


def _thaw_or_error(fleet: Fleet, window: str, agent_id: str) -> None:
    """A thaw whose agent is killed under it: either outcome is fine, the slots are checked."""
    with contextlib.suppress(CwmError):
        fleet.sessions.thaw_window(window, agent_id=agent_id)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "disk", 16) as mount:
        yield mount


def test_a_full_slot_directory_refuses_freeze_and_thaw_and_leaves_nothing(
    fleet: Fleet, gguf: Path, small_disk: Path
) -> None:
    fleet.server("full-src", gguf)
    fleet.agent("full-src")
    _session_on(fleet, "full-src", 0, words=60)
    fleet.sessions.freeze_session("slot-0", "for-full", agent_id="llama-full-src")
    server = LlamaServer(gguf, free_port(), small_disk, fleet.base / "llama-full.log", threads=1)
    fleet.servers["full"] = server
    server.launch()
    server.wait_ready()
    engine = fleet.agent("full")
    history = _session_on(fleet, "full", 1, words=60)
    filler = small_disk / "someone-elses-file"
    fill_disk(filler)
    for order in (
        lambda: fleet.sessions.freeze_session("slot-1", "too-big", agent_id="llama-full"),
        lambda: fleet.sessions.thaw_window("for-full", agent_id="llama-full"),
    ):
        with pytest.raises(ResourceExhausted) as full:
            order()
        assert full.value.reason == "DISK_FULL"
        assert _own_files(small_disk) == ["someone-elses-file"]
    assert [(s.session_id, s.token_count) for s in engine.sessions()] == [("slot-1", len(history))]
    filler.unlink()
    assert fleet.sessions.freeze_session("slot-1", "fits", agent_id="llama-full").window.token_count
    assert fleet.sessions.thaw_window("for-full", agent_id="llama-full").session_id == "slot-0"
    assert _own_files(small_disk) == []


def test_a_request_that_takes_the_slot_during_a_thaw_is_not_overwritten(
    fleet: Fleet, gguf: Path
) -> None:
    fleet.server("race-src", gguf)
    fleet.agent("race-src")
    history = _session_on(fleet, "race-src", 0, words=3)
    fleet.sessions.freeze_session("slot-0", "race-window", agent_id="llama-race-src")
    with fleet.windows.thaw("race-window") as stream:
        chunks = [chunk.data for chunk in stream]
    server = fleet.server("race", gguf)
    engine = fleet.agent("race")
    sink = engine.begin_import("slot-0", history, CHUNK_TOKENS)
    for index, chunk in enumerate(chunks):
        sink.add_chunk(index, chunk)
    client = completion(server.url, [1, 300, 301, 302], 0, n_predict=2)  # lands in slot 0
    with pytest.raises(Aborted) as taken:
        sink.finish()
    assert taken.value.reason == "SLOT_TAKEN"
    assert _own_files(server.slot_dir) == []
    again = completion(server.url, [1, 300, 301, 302, *client["tokens"][:1]], 0, n_predict=1)
    assert again["timings"]["cache_n"] == 4  # the client's own session, not the window
