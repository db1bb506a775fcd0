"""cwm as a vLLM v1 KV connector, end to end on vLLM's CPU build.

Two real vLLM servers (instances A and B, each its own process tree with an empty cache at
start) run the tiny Llama with the CwmConnector; agents beside them are dialled into a real
manager. Sessions are frozen on A and thawed on B through the agents' orders, exactly as in
production. Runs only where vLLM is installed (`make test-vllm` builds `.venv-vllm`).

The two servers are shared by every test of the module: starting a vLLM server is the slowest
step of the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here (make test-vllm uses .venv-vllm)")

from cwm_client import SessionClient, WindowClient
from cwm_client.chunks import bytes_per_token
from cwm_client.errors import (
    CwmError,
    DataLoss,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
)
from cwm_server.agent.engines.fingerprint import model_fingerprint
from cwm_server.agent.engines.reference.tiny_model import RECIPE, ensure_tiny_model
from cwm_server.agent.engines.vllm import staging
from cwm_server.agent.engines.vllm.adapter import VllmAdapter
from cwm_server.agent.engines.vllm.launch import VllmServer, complete
from cwm_server.agent.host_agent import HostAgent
from cwm_server.manager.config import ManagerConfig
from tests.helpers import ROOT, ThreadedAgent, ThreadedManager, free_port, synthetic_chunks
from tests.ops_helpers import wait_for
from tests.vllm_helpers import cached as _cached
from tests.vllm_helpers import complete_salted, wait_reported
from tests.vllm_helpers import prompt as _prompt
from tests.vllm_helpers import tokens_of as _tokens

BLOCK = 128
pytestmark = pytest.mark.timeout(900)


def _staged(engine: VllmAdapter, salt: str, token_ids: list[int], datas: list[Any]) -> Any:
    """A window staged for a load, as the agent stages it, but not submitted."""
    staged = engine.begin_import(salt, token_ids, 256)
    for index, data in enumerate(datas):
        staged.add_chunk(index, data)
    staged.stage()
    return staged


class VllmCluster:
    def __init__(self, base: Path, model_dir: Path) -> None:
        self.base = base
        self.model_dir = model_dir
        self.manager = ThreadedManager(ManagerConfig(data_dir=base / "data", listen="127.0.0.1:0"))
        self.dir_a, self.dir_b = base / "cwm-a", base / "cwm-b"
        self.vllm_a = VllmServer(model_dir, free_port(), self.dir_a, base / "vllm-a.log", cpu="0")
        self.vllm_b = VllmServer(model_dir, free_port(), self.dir_b, base / "vllm-b.log", cpu="1")
        self.agents: list[ThreadedAgent] = []
        started = time.monotonic()
        self.vllm_a.launch()
        self.vllm_b.launch()
        self.vllm_a.wait_ready()
        self.vllm_b.wait_ready()
        self.startup_seconds = time.monotonic() - started
        self.engine_a = VllmAdapter(self.vllm_a.url, self.dir_a)
        self.engine_b = VllmAdapter(self.vllm_b.url, self.dir_b)
        self.agent_a = self._agent(self.engine_a, "vllm-a")
        self.agent_b = self._agent(self.engine_b, "vllm-b")
        self.sessions = SessionClient(self.manager.target)
        self.windows = WindowClient(self.manager.target)
        self.model = self.engine_a.model_name

    def _agent(self, engine: VllmAdapter, agent_id: str) -> ThreadedAgent:
        # 256-token chunks (the tiny model's default span is larger): several per window,
        # so a damaged chunk leaves loaded blocks before it.
        agent = ThreadedAgent(HostAgent(engine, self.manager.target, agent_id, chunk_tokens=256))
        agent.wait_connected()
        self.agents.append(agent)
        return agent

    def complete(self, server: VllmServer, prompt: list[int], salt: str, **extra: Any) -> Any:
        return complete_salted(server.url, self.model, prompt, salt, **extra)

    def wait_reported(self, agent_id: str, session_id: str, tokens: int) -> None:
        wait_reported(self.sessions, agent_id, session_id, tokens)

    def close(self) -> None:
        self.sessions.close()
        self.windows.close()
        for agent in self.agents:
            agent.stop()
        self.engine_a.close()  # as `cwm agent` does on exit: frees its staging pool
        self.engine_b.close()
        self.vllm_a.stop()
        self.vllm_b.stop()
        self.manager.stop()


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[VllmCluster]:
    running = VllmCluster(tmp_path_factory.mktemp("vllm"), tiny_model_dir)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module")
def frozen_session(cluster: VllmCluster) -> dict[str, Any]:
    """A 700-token session with 16 generated tokens on A, frozen and thawed onto B."""
    context = _prompt(1, 700)
    first = cluster.complete(cluster.vllm_a, context, "sess-a", max_tokens=16)
    assert _cached(first) == 0
    history = context + _tokens(first)  # 716 tokens; the last one has no KV yet
    window_tokens = (len(history) - 1) // BLOCK * BLOCK  # 640: the whole blocks
    cluster.wait_reported("vllm-a", "sess-a", window_tokens)

    frozen = cluster.sessions.freeze_session("sess-a", "vllm-window", agent_id="vllm-a")
    started = time.perf_counter()
    thawed = cluster.sessions.thaw_window("vllm-window", agent_id="vllm-b", new_session_id="sess-b")
    thaw_seconds = time.perf_counter() - started
    return {
        "history": history,
        "window_tokens": window_tokens,
        "frozen": frozen,
        "thawed": thawed,
        "thaw_seconds": thaw_seconds,
    }


def test_freeze_on_a_thaw_on_fresh_b_continues_identically(
    cluster: VllmCluster, frozen_session: dict[str, Any]
) -> None:
    history, tokens = frozen_session["history"], frozen_session["window_tokens"]
    frozen, thawed = frozen_session["frozen"], frozen_session["thawed"]
    assert frozen.agent_id == "vllm-a"
    assert frozen.window.token_count == tokens == 640
    assert frozen.window.chunk_count == 3  # 256 + 256 + 128 tokens
    assert frozen.window.fingerprint.engine_name == "vllm"
    assert frozen.window.fingerprint.block_size == BLOCK
    assert thawed.agent_id == "vllm-b" and thawed.endpoint == cluster.vllm_b.url
    assert thawed.session_id == thawed.cache_salt == "sess-b"
    assert list(thawed.token_ids) == history[:tokens]

    # `cwm sessions` lists vLLM sessions on both instances.
    cluster.wait_reported("vllm-b", "sess-b", tokens)

    # Uninterrupted: A continues its own session. Thawed: B continues from the window.
    continuation = history + _prompt(2, 40)
    on_a = cluster.complete(cluster.vllm_a, continuation, "sess-a", max_tokens=32)
    on_b = cluster.complete(cluster.vllm_b, continuation, "sess-b", max_tokens=32)
    assert _cached(on_a) == tokens
    assert _cached(on_b) == tokens  # every whole block of the window came from cwm
    assert len(_tokens(on_b)) == 32
    assert _tokens(on_a) == _tokens(on_b)


def test_another_cache_salt_gets_no_hit_from_the_window(
    cluster: VllmCluster, frozen_session: dict[str, Any]
) -> None:
    history = frozen_session["history"]
    continuation = history + _prompt(2, 40)
    stranger = cluster.complete(cluster.vllm_b, continuation, "stranger", max_tokens=1)
    assert _cached(stranger) == 0
    unsalted = complete(
        cluster.vllm_b.url, model=cluster.model, prompt=continuation, max_tokens=1, temperature=0
    )
    assert _cached(unsalted) == 0

    # A load directive naming a staged window only works with that session's salt.
    engine = cluster.engine_b
    window = cluster.windows.get(frozen_session["frozen"].window.name)
    with cluster.windows.thaw(window.name) as stream:
        datas = [chunk.data for chunk in stream]
    tokens = frozen_session["window_tokens"]
    staged = _staged(engine, "owner", history[:tokens], datas)
    directory = staged.directory
    try:
        reply = engine._complete(history[: tokens + 1], "intruder", "load", staged.op_id)
        assert _cached(reply) == 0
        note = json.loads((directory / staging.SCHEDULER_FILE).read_text())
        assert note["claimed_tokens"] == 0
        assert "cache_salt" in note["refusal"]
        assert not (directory / staging.RESULT_FILE).exists()  # the worker loaded nothing
    finally:
        staged.abort()
    assert not staged.chunk_dir.exists() and not directory.exists()


def test_a_full_staging_folder_fails_the_thaw_and_leaves_nothing_staged(
    cluster: VllmCluster, frozen_session: dict[str, Any], tmp_path: Path
) -> None:
    """Chunks staged into a 300 KiB tmpfs (room for one 256 KiB chunk of three): the thaw
    fails RESOURCE_EXHAUSTED naming the folder, nothing stays staged, no session appears and
    B goes on serving."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(small)], check=True)
    engine = cluster.engine_b
    real_root = engine.chunk_root
    try:
        staging.ensure_chunk_root(small)
        engine.chunk_root = small
        with pytest.raises(ResourceExhausted) as full:
            cluster.sessions.thaw_window(
                frozen_session["frozen"].window.name, agent_id="vllm-b", new_session_id="full"
            )
        assert full.value.reason == "STAGING_FULL"
        assert str(small) in full.value.message
        assert [p for p in small.rglob("*") if p.is_file()] == []
        assert not any((cluster.dir_b / staging.LOAD_DIR).iterdir())
    finally:
        engine.chunk_root = real_root
        subprocess.run(["umount", str(small)], check=True)
    assert not any(s.session_id == "full" for s in engine.sessions())
    history = frozen_session["history"]
    reply = cluster.complete(cluster.vllm_b, history + _prompt(2, 8), "full", max_tokens=2)
    assert _cached(reply) == 0  # recomputed: nothing of the failed thaw reached the cache


def test_window_of_another_model_is_refused_before_any_kv_is_loaded(
    cluster: VllmCluster, tmp_path: Path
) -> None:
    other_dir = ensure_tiny_model(tmp_path / "other", dict(RECIPE, seed=RECIPE["seed"] + 1))
    theirs = model_fingerprint(other_dir, kv_dtype="bfloat16", engine_name="vllm", block_size=BLOCK)
    theirs.engine_version = cluster.engine_b.fingerprint.engine_version
    assert theirs.weights_digest != cluster.engine_b.fingerprint.weights_digest
    tokens = 512
    cluster.windows.freeze(
        "other-model-window",
        synthetic_chunks(tokens, theirs, chunk_tokens=256),
        fingerprint=theirs,
        token_ids=_prompt(3, tokens),
        chunk_tokens=256,
        session_id="elsewhere",
        cache_salt="elsewhere",
    )
    assert bytes_per_token(theirs) == bytes_per_token(cluster.engine_b.fingerprint)
    before = sorted(p.name for p in (cluster.dir_b / staging.LOAD_DIR).iterdir())
    with pytest.raises(FailedPrecondition) as refused:
        cluster.sessions.thaw_window(
            "other-model-window", agent_id="vllm-b", new_session_id="other-model"
        )
    assert "weights_digest" in refused.value.message
    assert sorted(p.name for p in (cluster.dir_b / staging.LOAD_DIR).iterdir()) == before
    assert not any(s.session_id == "other-model" for s in cluster.engine_b.sessions())


def test_failed_chunk_is_recomputed_never_used(
    cluster: VllmCluster, frozen_session: dict[str, Any]
) -> None:
    """A staged chunk damaged after staging: the connector refuses it before it reaches the
    cache, reports its blocks to vLLM (kv_load_failure_policy=recompute), and B's KV for
    those tokens is recomputed: the blocks before it are the window's bytes, the rest are
    B's own computation, never the damaged bytes."""
    history, tokens = frozen_session["history"], frozen_session["window_tokens"]
    engine = cluster.engine_b
    with cluster.windows.thaw(frozen_session["frozen"].window.name) as stream:
        datas = [chunk.data for chunk in stream]
    staged = _staged(engine, "damaged", history[:tokens], datas)
    directory = staged.directory
    damaged = staged.chunk_dir / staging.chunk_file_name(1)
    raw = bytearray(damaged.read_bytes())
    raw[1000] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    try:
        engine._submit_load(history[: tokens + 1], "damaged", staged.op_id)
        with pytest.raises(DataLoss) as lost:
            engine._check_load(directory, "damaged")
        assert "BLAKE3" in lost.value.message and "recomputed" in lost.value.message
        result = json.loads((directory / staging.RESULT_FILE).read_text())
        assert result["loaded_blocks"] == 2  # chunk 0 (two blocks) went in, chunk 1 did not
        assert result["asynchronous"] is True  # loaded off the engine's step
    finally:
        staged.abort()

    # What B now holds under that salt, read back through the connector.
    staging.write_json_atomic(
        staging.session_path(cluster.dir_b, "damaged"),
        {"cache_salt": "damaged", "token_ids": history, "kv_tokens": tokens, "finished_at": 0},
    )
    exported = engine.export_session("damaged", 256)
    shape = (2, 4, 256, 64)

    def as_array(data: bytes, count: int = 256) -> np.ndarray:
        values = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return values.view(np.float32).reshape((*shape[:2], count, shape[3]))

    assert exported.chunks[0] == datas[0]  # loaded from the window, bit for bit
    assert exported.chunks[1] != bytes(raw)
    recomputed, original = as_array(exported.chunks[1]), as_array(datas[1])
    assert np.abs(recomputed - original).max() < 0.25  # B's own numbers, not garbage
    continuation = history + _prompt(2, 40)
    reply = cluster.complete(cluster.vllm_b, continuation, "damaged", max_tokens=8)
    assert _cached(reply) == tokens


_KILLING_AGENT = """
import os, signal, sys, threading, time
from cwm_server.agent.engines.vllm import adapter as vllm_adapter
from cwm_server.agent.engines.vllm import staging as vllm_staging

point = os.environ["CWM_TEST_KILL_AT"]
if point == "staging":
    real_write = vllm_staging.write_json_atomic

    def write_json_atomic(path, payload):
        if path.name == vllm_staging.MANIFEST_FILE:
            os.kill(os.getpid(), signal.SIGKILL)  # chunks written, manifest not
        real_write(path, payload)

    vllm_adapter.staging.write_json_atomic = write_json_atomic
else:
    real_submit = vllm_adapter.VllmAdapter._submit_load

    def _submit_load(self, prompt, session_id, op_id):
        threading.Thread(target=real_submit, args=(self, prompt, session_id, op_id)).start()
        time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)  # the load request is on its way to vLLM

    vllm_adapter.VllmAdapter._submit_load = _submit_load

from cwm_server.cli.main import main
sys.exit(main())
"""


@pytest.mark.parametrize("point", ["staging", "submit"])
def test_killing_the_agent_during_a_thaw_leaves_b_serving_correctly(
    cluster: VllmCluster, frozen_session: dict[str, Any], point: str
) -> None:
    history, tokens = frozen_session["history"], frozen_session["window_tokens"]
    agent_id = f"vllm-b-doomed-{point}"
    env = dict(os.environ, CWM_TEST_KILL_AT=point)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    log = open(cluster.base / f"{agent_id}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _KILLING_AGENT,
            *cluster.vllm_b.agent_args(agent_id, cluster.manager.target),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(
            lambda: any(a.agent_id == agent_id for a in cluster.sessions.list_agents()),
            timeout=60,
            what="the doomed agent to connect",
        )
        salt = f"killed-{point}"
        with pytest.raises(CwmError) as failed:
            cluster.sessions.thaw_window(
                frozen_session["frozen"].window.name, agent_id=agent_id, new_session_id=salt
            )
        assert isinstance(failed.value, Unavailable), failed.value
        assert proc.wait(timeout=30) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()

    # B serves the session's continuation correctly: either the load finished before the
    # agent died (the window's KV, so A's output) or it never happened (B recomputes, so
    # B's own output for a fresh salt). Never anything else.
    continuation = history + _prompt(2, 40)
    reply = cluster.complete(cluster.vllm_b, continuation, salt, max_tokens=32)
    uninterrupted = cluster.complete(cluster.vllm_a, continuation, "sess-a", max_tokens=32)
    recomputed = cluster.complete(cluster.vllm_b, continuation, f"fresh-{point}", max_tokens=32)
    assert _cached(recomputed) == 0
    if point == "staging":
        assert _cached(reply) == 0
        leftovers = list((cluster.dir_b / staging.LOAD_DIR).glob(".*.building"))
        assert leftovers  # the half-staged window, never named, never loaded
        chunk_load_dir = cluster.engine_b.chunk_root / staging.LOAD_DIR
        assert any(chunk_load_dir.iterdir())  # its chunks, in shared memory
        # An agent that starts releases what the dead one staged.
        VllmAdapter(cluster.vllm_b.url, cluster.dir_b)
        assert not any(chunk_load_dir.iterdir())
        assert not list((cluster.dir_b / staging.LOAD_DIR).glob(".*.building"))
    if _cached(reply) == tokens:
        assert _tokens(reply) == _tokens(uninterrupted)
    else:
        assert _cached(reply) == 0
        assert _tokens(reply) == _tokens(recomputed)
    # ... and B's regular agent still thaws and serves normally afterwards.
    again = cluster.sessions.thaw_window(
        frozen_session["frozen"].window.name, agent_id="vllm-b", new_session_id=f"after-{point}"
    )
    after = cluster.complete(cluster.vllm_b, continuation, again.session_id, max_tokens=32)
    assert _cached(after) == tokens
    assert _tokens(after) == _tokens(uninterrupted)


def test_ttft_after_thaw_vs_recompute(cluster: VllmCluster, frozen_session: dict[str, Any]) -> None:
    """Not a benchmark (tools/bench/vllm_ttft.py is): thawed KV must make B's first token
    cheaper than recomputing the same prompt, measured in the same run."""
    history = frozen_session["history"]
    continuation = history + _prompt(9, 20)
    cluster.sessions.thaw_window(
        frozen_session["frozen"].window.name, agent_id="vllm-b", new_session_id="ttft"
    )
    started = time.perf_counter()
    thawed = cluster.complete(cluster.vllm_b, continuation, "ttft")
    with_thaw = time.perf_counter() - started
    started = time.perf_counter()
    cold = cluster.complete(cluster.vllm_b, continuation, "ttft-cold")
    recompute = time.perf_counter() - started
    assert _cached(thawed) == 640 and _cached(cold) == 0
    print(
        f"\nvLLM B, {len(continuation)}-token prompt: TTFT with thaw {with_thaw * 1000:.1f} ms, "
        f"recompute {recompute * 1000:.1f} ms; thaw order {frozen_session['thaw_seconds']:.2f} s; "
        f"two vLLM servers started in {cluster.startup_seconds:.0f} s"
    )
