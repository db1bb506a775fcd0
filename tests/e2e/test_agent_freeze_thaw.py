"""Agents, engines and the manager together: a real session's KV leaves one engine and
continues in another, bit for bit. Every hop is real: HTTP to the engines, gRPC between
agents and the manager, the manager's durable store in between."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cwm_client import SessionClient, WindowClient
from cwm_client.errors import FailedPrecondition, InvalidArgument, NotFound
from cwm_server.agent.auto_freeze import AutoFreezePolicy
from cwm_server.agent.engines.reference.adapter import ReferenceAdapter
from cwm_server.agent.engines.reference.engine import ReferenceEngine
from cwm_server.agent.host_agent import HostAgent
from cwm_server.manager.config import ManagerConfig
from tests.helpers import ROOT, ManagerProcess, ThreadedAgent, ThreadedManager, free_port
from tests.ops_helpers import wait_for


def _prompt(seed: int, count: int) -> list[int]:
    """Random ids above the special tokens: a context the model has never seen."""
    return [int(t) for t in np.random.default_rng(seed).integers(16, 2048, size=count)]


def _complete(endpoint: str, **body: Any) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{endpoint}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def _wait(predicate: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Cluster:
    def __init__(self, data_dir: Path, model_dir: Path) -> None:
        self.manager = ThreadedManager(ManagerConfig(data_dir=data_dir, listen="127.0.0.1:0"))
        self.engine_a = ReferenceAdapter(ReferenceEngine(model_dir))
        self.engine_b = ReferenceAdapter(ReferenceEngine(model_dir))
        self.agent_a = ThreadedAgent(HostAgent(self.engine_a, self.manager.target, "node-a"))
        self.agent_b = ThreadedAgent(HostAgent(self.engine_b, self.manager.target, "node-b"))
        self.agent_a.wait_connected()
        self.agent_b.wait_connected()
        self.sessions = SessionClient(self.manager.target)
        self.windows = WindowClient(self.manager.target)

    def wait_reported(self, session_id: str, tokens: int) -> None:
        _wait(
            lambda: any(
                s.session_id == session_id and s.token_count == tokens
                for s in self.sessions.list_sessions()
            ),
            what=f"session {session_id} with {tokens} tokens to be reported",
        )

    def close(self) -> None:
        self.sessions.close()
        self.windows.close()
        self.agent_a.stop()
        self.agent_b.stop()
        self.engine_a.close()
        self.engine_b.close()
        self.manager.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Cluster]:
    running = Cluster(tmp_path_factory.mktemp("e2e") / "data", tiny_model_dir)
    yield running
    running.close()


@pytest.mark.parametrize(
    ("seed", "length", "extension"), [(1, 700, 24), (2, 513, 1), (3, 1100, 60)]
)
def test_thaw_on_another_node_continues_bit_for_bit(
    cluster: Cluster, seed: int, length: int, extension: int
) -> None:
    salt = f"lossless-{seed}"
    context = _prompt(seed, length)
    more = _prompt(seed + 100, extension)
    first = _complete(cluster.engine_a.endpoint, prompt=context, cache_salt=salt, max_tokens=1)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cluster.wait_reported(salt, length)

    frozen = cluster.sessions.freeze_session(salt, f"lossless-{seed}")
    assert frozen.agent_id == "node-a" and frozen.window.token_count == length
    thawed = cluster.sessions.thaw_window(f"lossless-{seed}", agent_id="node-b")
    assert thawed.agent_id == "node-b" and thawed.endpoint == cluster.engine_b.endpoint
    assert list(thawed.token_ids) == context
    assert json.loads(thawed.request_fields) == {"cache_salt": thawed.session_id}

    def reported() -> list[Any]:
        return [
            json.loads(s.request_fields)
            for s in cluster.sessions.list_sessions("node-b")
            if s.session_id == thawed.session_id
        ]

    wait_for(lambda: bool(reported()), what="the thawed session to be reported")
    assert reported() == [{"cache_salt": thawed.session_id}]

    # Uninterrupted: node-a continues its own session. Thawed: node-b continues from the
    # window. Both compute only the new tokens over the cached context.
    on_a = cluster.engine_a.engine.prefill(salt, context + more)
    on_b = cluster.engine_b.engine.prefill(thawed.session_id, context + more)
    assert on_a.cached_tokens == on_b.cached_tokens == length
    assert torch.equal(on_a.logits, on_b.logits)

    follow_up = context + more + _prompt(seed + 200, 3)
    a = _complete(
        cluster.engine_a.endpoint, prompt=follow_up, cache_salt=salt, max_tokens=32, temperature=0
    )
    b = _complete(
        cluster.engine_b.endpoint,
        prompt=follow_up,
        cache_salt=thawed.cache_salt,
        max_tokens=32,
        temperature=0,
    )
    assert a["choices"][0]["token_ids"] == b["choices"][0]["token_ids"]
    assert len(b["choices"][0]["token_ids"]) == 32
    assert b["usage"]["prompt_tokens_details"]["cached_tokens"] == length + extension


def test_a_session_under_any_salt_an_engine_takes_can_be_frozen_and_thawed_under_it(
    cluster: Cluster,
) -> None:
    salt = "bad salt! (spaces, punctuation, ünïcode)"
    _complete(cluster.engine_a.endpoint, prompt=_prompt(8, 300), cache_salt=salt, max_tokens=1)
    cluster.wait_reported(salt, 300)
    cluster.sessions.freeze_session(salt, "odd-salt")
    thawed = cluster.sessions.thaw_window("odd-salt", agent_id="node-b", new_session_id=salt)
    assert thawed.cache_salt == salt
    with pytest.raises(InvalidArgument) as refused:
        cluster.sessions.thaw_window("odd-salt", agent_id="node-b", new_session_id="a\nb")
    assert refused.value.field == "new_session_id"  # the agent's field, relayed by the manager
    assert "control character" in refused.value.message


def test_thaw_into_an_engine_with_another_fingerprint_is_refused(
    cluster: Cluster, tiny_model_dir: Path
) -> None:
    salt = "fingerprint-src"
    _complete(cluster.engine_a.endpoint, prompt=_prompt(7, 300), cache_salt=salt, max_tokens=1)
    cluster.wait_reported(salt, 300)
    cluster.sessions.freeze_session(salt, "fp-window")
    other = ReferenceAdapter(ReferenceEngine(tiny_model_dir, dtype="float32"))
    agent = ThreadedAgent(HostAgent(other, cluster.manager.target, "node-f32"))
    try:
        agent.wait_connected()
        with pytest.raises(FailedPrecondition) as refused:
            cluster.sessions.thaw_window("fp-window", agent_id="node-f32")
        assert "kv_dtype" in refused.value.message
        assert "KV_DTYPE_BFLOAT16" in refused.value.message
        assert not other.sessions()
    finally:
        agent.stop()
        other.close()


def test_refreeze_after_growth_sends_only_new_chunks(cluster: Cluster) -> None:
    salt = "incremental"
    context = _prompt(11, 2560)  # exactly 10 chunks of 256 tokens
    _complete(cluster.engine_a.endpoint, prompt=context, cache_salt=salt, max_tokens=1)
    cluster.wait_reported(salt, 2560)
    first = cluster.sessions.freeze_session(salt, "incr-1")
    assert (first.chunks_sent, first.chunks_reused) == (10, 0)

    grown = context + _prompt(12, 256)  # +10%: one new chunk
    reply = _complete(cluster.engine_a.endpoint, prompt=grown, cache_salt=salt, max_tokens=1)
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 2560
    cluster.wait_reported(salt, 2816)
    second = cluster.sessions.freeze_session(salt, "incr-2")
    chunk_bytes = second.window.raw_bytes // second.window.chunk_count
    assert (second.chunks_sent, second.chunks_reused) == (1, 10)
    assert second.bytes_sent == chunk_bytes
    assert second.window.parent == "incr-1"
    assert second.window.raw_bytes == 11 * chunk_bytes


def test_unknown_session_and_window_are_not_found(cluster: Cluster) -> None:
    with pytest.raises(NotFound):
        cluster.sessions.freeze_session("no-such-session", "whatever")
    with pytest.raises(NotFound):
        cluster.sessions.thaw_window("no-such-window")


def test_cli_lists_agents_and_sessions_and_orders(cluster: Cluster) -> None:
    salt = "cli-session"
    _complete(cluster.engine_a.endpoint, prompt=_prompt(21, 300), cache_salt=salt, max_tokens=1)
    cluster.wait_reported(salt, 300)

    def cwm(*args: str) -> Any:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "cwm_server.cli.main",
                *args,
                "--manager",
                cluster.manager.target,
                "--json",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return json.loads(out.stdout)

    assert {a["agent_id"] for a in cwm("agents")} >= {"node-a", "node-b"}
    assert salt in {s["session_id"] for s in cwm("sessions", "--agent", "node-a")}
    frozen = cwm("freeze", salt, "cli-window")
    assert frozen["agent_id"] == "node-a" and frozen["tokens"] == 300
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "cwm_server.cli.main",
            "freeze",
            salt,
            "cli-window",
            "--manager",
            cluster.manager.target,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 1 and "ALREADY_EXISTS" in again.stderr
    assert "cwm freeze --replace" in again.stderr  # the hint names a flag that exists
    replaced = cwm("freeze", salt, "cli-window", "--replace")
    assert replaced["name"] == "cli-window" and replaced["tokens"] == 300
    thawed = cwm("thaw", "cli-window", "--agent", "node-b", "--session", "cli-thawed")
    assert thawed["session_id"] == "cli-thawed" and thawed["endpoint"] == cluster.engine_b.endpoint
    assert thawed["token_ids"] == _prompt(21, 300)  # what the next prompt starts with
    reply = _complete(
        thawed["endpoint"], prompt=[*thawed["token_ids"], 42], cache_salt="cli-thawed", max_tokens=1
    )
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 300


def test_auto_freeze_fires_at_threshold_and_is_thawable(
    cluster: Cluster, tiny_model_dir: Path
) -> None:
    engine = ReferenceAdapter(ReferenceEngine(tiny_model_dir))
    agent = ThreadedAgent(
        HostAgent(engine, cluster.manager.target, "node-auto", policy=AutoFreezePolicy(tokens=512))
    )
    try:
        agent.wait_connected()
        salt = "auto-session"
        _complete(engine.endpoint, prompt=_prompt(31, 400), cache_salt=salt, max_tokens=1)
        time.sleep(1.0)  # below the threshold: nothing happens
        assert not list(cluster.windows.list(session_id=salt))
        _complete(
            engine.endpoint,
            prompt=_prompt(31, 400) + _prompt(32, 200),
            cache_salt=salt,
            max_tokens=1,
        )
        first = _wait(lambda: list(cluster.windows.list(session_id=salt)), what="auto-freeze")
        assert len(first) == 1 and first[0].token_count == 600
        assert first[0].tags["cwm.auto"] == "true"

        thawed = cluster.sessions.thaw_window(first[0].name, agent_id="node-b")
        on_b = cluster.engine_b.engine.prefill(
            thawed.session_id, _prompt(31, 400) + _prompt(32, 200) + [99]
        )
        on_auto = engine.engine.prefill(salt, _prompt(31, 400) + _prompt(32, 200) + [99])
        assert on_b.cached_tokens == 600
        assert torch.equal(on_b.logits, on_auto.logits)

        context = _prompt(31, 400) + _prompt(32, 200) + [99] + _prompt(33, 600)
        _complete(engine.endpoint, prompt=context, cache_salt=salt, max_tokens=1)
        windows = _wait(
            lambda: [w for w in cluster.windows.list(session_id=salt) if w.token_count == 1201],
            what="second auto-freeze",
        )
        assert windows[0].parent == first[0].name
    finally:
        agent.stop()
        engine.close()


def test_agent_reconnects_after_manager_restart(tmp_path: Path, tiny_model_dir: Path) -> None:
    port = free_port()
    # The gRPC port stays fixed across the restart; the bulk port takes any free one, since
    # "auto" (gRPC port + 1) can be taken meanwhile by an ephemeral socket, such as one of
    # the agent's own reconnect attempts.
    bulk = ["--bulk-listen", "127.0.0.1:0"]
    process = ManagerProcess(tmp_path / "data", ["--listen", f"127.0.0.1:{port}", *bulk])
    process.start()
    engine = ReferenceAdapter(ReferenceEngine(tiny_model_dir))
    host = HostAgent(engine, f"127.0.0.1:{port}", "node-r", backoff=(0.1, 1.0))
    agent = ThreadedAgent(host)
    try:
        agent.wait_connected()
        _complete(engine.endpoint, prompt=_prompt(41, 300), cache_salt="r1", max_tokens=1)
        process.stop()
        _wait(lambda: not host.connected.is_set(), what="the agent to notice the restart")
        process.start()
        _wait(lambda: host.connections >= 2, what="the agent to reconnect")
        with SessionClient(f"127.0.0.1:{port}") as sessions:
            _wait(lambda: sessions.list_sessions("node-r"), what="the agent's report")
            frozen = sessions.freeze_session("r1", "after-restart")
            assert frozen.window.token_count == 300
            thawed = sessions.thaw_window("after-restart", new_session_id="r2")
            assert thawed.agent_id == "node-r" and thawed.session_id == "r2"
    finally:
        agent.stop()
        engine.close()
        process.stop()


def test_cli_freeze_that_waits_says_what_it_waits_for(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cwm_server.cli import session_cmds
    from cwm_server.cli.main import build_parser
    from cwm_server.cli.options import apply_global_defaults

    salt = "cli-slow-freeze"
    _complete(cluster.engine_a.endpoint, prompt=_prompt(23, 300), cache_salt=salt, max_tokens=1)
    cluster.wait_reported(salt, 300)
    monkeypatch.setattr(session_cmds, "FREEZE_NOTICE_S", 0.0)  # any freeze "takes long"
    # The command's handler in this process (not `main`, which would point the logging of
    # every later test at this test's captured stderr).
    args = build_parser().parse_args(
        ["freeze", salt, "cli-slow", "--manager", cluster.manager.target]
    )
    apply_global_defaults(args)
    assert args.handler(args) == 0
    captured = capsys.readouterr()
    assert f"waiting for the agent to freeze {salt!r}" in captured.err
    assert "cli-slow" in captured.out
