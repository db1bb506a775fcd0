"""Time to first token on a freshly started llama-server: a thawed slot vs recomputing.

Everything runs as real processes on loopback: a manager (`cwm serve`), llama-server A and,
`--repeat` times, a freshly started llama-server B (one core each, `--threads 1`), with an
agent beside each (`cwm agent --engine llama-server`). A session of `--tokens` tokens is
built in A's slot 0 and frozen; on each fresh B the window is thawed into slot 0 and the
session's continuation (`--extension` new tokens) is sent to it, against the same prompt in
B's empty slot 1 (B recomputes it); the two are taken in alternating order. TTFT is the
latency of an `n_predict=1` request: prefill plus one sampled token; "thaw + TTFT" adds the
thaw order (ThawWindow through the manager -> agent -> slot file -> restore, timed in this
process with the SDK, so no CLI start-up is counted).

    .venv/bin/python tools/bench/llamacpp_ttft.py --tokens 4096 --repeat 3

Prints a JSON summary and a Markdown table row.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cwm_client import SessionClient
from cwm_server.agent.engines.llamacpp.launch import LlamaServer, completion, server_binary


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cwm(*args: str, manager: str) -> Any:
    out = subprocess.run(
        [sys.executable, "-m", "cwm_server.cli.main", *args, "--manager", manager, "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(out.stdout)


def _wait_session(manager: str, agent: str, session: str, tokens: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            listed = _cwm("sessions", "--agent", agent, manager=manager)
        except subprocess.CalledProcessError:
            listed = []  # the agent has not connected yet (NOT_FOUND): ask again
        if any(s["session_id"] == session and s["tokens"] >= tokens for s in listed):
            return
        time.sleep(0.3)
    raise TimeoutError(f"session {session} was not reported by {agent}")


def _wait_agent(manager: str, agent: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(a["agent_id"] == agent for a in _cwm("agents", manager=manager)):
            return
        time.sleep(0.2)
    raise TimeoutError(f"agent {agent} did not connect")


def _agent(name: str, server: LlamaServer, manager: str, log: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "cwm_server.cli.main",
        "agent",
        "--engine",
        "llama-server",
        "--llama-url",
        server.url,
        "--slot-dir",
        str(server.slot_dir),
        "--agent-id",
        name,
        "--manager",
        manager,
    ]
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="cwm-llama-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        from cwm_server.agent.engines.llamacpp.tiny_gguf import ensure_tiny_gguf

        model = str(ensure_tiny_gguf(work / "tiny.gguf"))
    options = {
        "binary": args.server,
        "ctx_per_slot": args.tokens + args.extension + 64,
        "threads": 1,
    }
    procs: list[subprocess.Popen[bytes]] = []
    servers: list[LlamaServer] = []
    try:
        port_file = work / "manager.port"
        port_file.unlink(missing_ok=True)
        with (work / "manager.log").open("ab") as log:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "cwm_server.cli.main",
                        "serve",
                        "--data-dir",
                        str(work / "data"),
                        "--listen",
                        "127.0.0.1:0",
                        "--port-file",
                        str(port_file),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        a = LlamaServer(model, _free_port(), work / "slots-a", work / "a.log", cpu="0", **options)
        servers.append(a)
        a.launch()
        a.wait_ready()
        while not port_file.exists():
            time.sleep(0.05)
        manager = f"127.0.0.1:{int(port_file.read_text())}"
        procs.append(_agent("bench-a", a, manager, work / "agent-a.log"))
        rng = np.random.default_rng(20240917)
        context = [int(t) for t in rng.integers(16, 2000, size=args.tokens)]
        first = completion(a.url, context, 0, n_predict=2)
        history = context + first["tokens"][:-1]
        _wait_session(manager, "bench-a", "slot-0", len(history))
        sessions = SessionClient(manager)
        t0 = time.perf_counter()
        frozen = sessions.freeze_session("slot-0", "bench-window", agent_id="bench-a")
        freeze_s = time.perf_counter() - t0
        continuation = history + [int(t) for t in rng.integers(16, 2000, size=args.extension)]
        thaw_s, with_thaw, recompute, startup = [], [], [], []
        for i in range(args.repeat):
            t0 = time.perf_counter()
            b = LlamaServer(
                model, _free_port(), work / f"slots-b{i}", work / f"b{i}.log", cpu="1", **options
            )
            servers.append(b)
            b.launch()
            b.wait_ready()
            startup.append(time.perf_counter() - t0)
            name = f"bench-b{i}"
            agent = _agent(name, b, manager, work / f"agent-b{i}.log")
            try:
                _wait_agent(manager, name)
                order = ("thaw", "recompute") if i % 2 == 0 else ("recompute", "thaw")
                for step in order:
                    if step == "thaw":
                        t0 = time.perf_counter()
                        sessions.thaw_window("bench-window", agent_id=name)
                        thaw_s.append(time.perf_counter() - t0)
                        slot, bucket, cached = 0, with_thaw, len(history)
                    else:
                        slot, bucket, cached = 1, recompute, 0
                    t0 = time.perf_counter()
                    reply = completion(b.url, continuation, slot, n_predict=1)
                    bucket.append(time.perf_counter() - t0)
                    if reply["timings"]["cache_n"] != cached:
                        raise AssertionError(
                            f"slot {slot}: {reply['timings']['cache_n']} cached, {cached} expected"
                        )
            finally:
                _stop(agent)
                b.stop()
        thaw_ms = statistics.median(thaw_s) * 1000
        ttft_ms = statistics.median(with_thaw) * 1000
        cold_ms = statistics.median(recompute) * 1000
        return {
            "prompt_tokens": len(continuation),
            "window_tokens": len(history),
            "window_raw_bytes": frozen.bytes_sent,
            "repeat": args.repeat,
            "thaw_order_ms": round(thaw_ms, 1),
            "ttft_after_thaw_ms": round(ttft_ms, 1),
            "thaw_plus_ttft_ms": round(thaw_ms + ttft_ms, 1),
            "ttft_recompute_ms": round(cold_ms, 1),
            "speedup_ttft": round(cold_ms / ttft_ms, 1),
            "speedup_thaw_plus_ttft": round(cold_ms / (thaw_ms + ttft_ms), 1),
            "freeze_order_s": round(freeze_s, 3),
            "server_startup_s": round(statistics.median(startup), 2),
            "engine": f"llama-server {server_binary() if args.server is None else args.server}",
            "model": Path(model).name,
        }
    finally:
        for proc in procs:
            _stop(proc)
        for server in servers:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="context length of the session")
    parser.add_argument("--extension", type=int, default=32, help="new tokens in the continuation")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--model", default=None, help="GGUF file (default: the tiny GGUF)")
    parser.add_argument("--server", default=None, help="llama-server binary")
    parser.add_argument("--work-dir", default=None)
    result = run(parser.parse_args())
    print(json.dumps(result, indent=2))
    print(
        f"| llama-server, {result['prompt_tokens']}-token prompt, {result['window_tokens']} "
        f"thawed | {result['thaw_order_ms']} ms + {result['ttft_after_thaw_ms']} ms | "
        f"{result['ttft_recompute_ms']} ms | {result['speedup_ttft']}x "
        f"({result['speedup_thaw_plus_ttft']}x with the thaw) |"
    )


if __name__ == "__main__":
    main()
