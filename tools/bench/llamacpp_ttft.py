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
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
from common import ManagerProcess, free_port, machine

from cwm_client import SessionClient
from cwm_server.agent.engines.llamacpp.launch import LlamaServer, completion, server_binary


def _until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _agent(server: LlamaServer, name: str, manager: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cwm_server.cli.main", *server.agent_args(name, manager)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


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
    options = {"binary": args.server, "ctx_per_slot": args.tokens + args.extension + 64}
    options["threads"] = 1
    procs: list[subprocess.Popen[bytes]] = []
    servers: list[LlamaServer] = []
    with ManagerProcess(work / "data") as manager, SessionClient(manager.target) as sessions:

        def connected(agent: str) -> bool:
            return any(a.agent_id == agent for a in sessions.list_agents())

        def reported(session: str, tokens: int) -> bool:
            if not connected("bench-a"):
                return False
            listed = sessions.list_sessions("bench-a")
            return any(s.session_id == session and s.token_count == tokens for s in listed)

        try:
            a = LlamaServer(
                model, free_port(), work / "slots-a", work / "a.log", cpu="0", **options
            )
            servers.append(a)
            a.launch()
            a.wait_ready()
            procs.append(_agent(a, "bench-a", manager.target, work / "agent-a.log"))
            rng = np.random.default_rng(20240917)
            context = [int(t) for t in rng.integers(16, 2000, size=args.tokens)]
            first = completion(a.url, context, 0, n_predict=2)
            history = context + first["tokens"][:-1]
            _until(lambda: reported("slot-0", len(history)), "bench-a to report slot-0")
            t0 = time.perf_counter()
            frozen = sessions.freeze_session("slot-0", "bench-window", agent_id="bench-a")
            freeze_s = time.perf_counter() - t0
            continuation = history + [int(t) for t in rng.integers(16, 2000, size=args.extension)]
            thaw_s, with_thaw, recompute, startup = [], [], [], []
            for i in range(args.repeat):
                t0 = time.perf_counter()
                b = LlamaServer(
                    model, free_port(), work / f"slots-b{i}", work / f"b{i}.log", cpu="1", **options
                )
                servers.append(b)
                b.launch()
                b.wait_ready()
                startup.append(time.perf_counter() - t0)
                name = f"bench-b{i}"
                agent = _agent(b, name, manager.target, work / f"agent-b{i}.log")
                try:
                    _until(lambda name=name: connected(name), f"{name} to connect")
                    for step in ("thaw", "recompute")[:: 1 if i % 2 == 0 else -1]:
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
                                f"slot {slot}: {reply['timings']['cache_n']} cached, "
                                f"{cached} expected"
                            )
                finally:
                    _stop(agent)
                    b.stop()
        finally:
            for proc in procs:
                _stop(proc)
            for server in servers:
                server.stop()
    thaw_ms = statistics.median(thaw_s) * 1000
    ttft_ms = statistics.median(with_thaw) * 1000
    cold_ms = statistics.median(recompute) * 1000
    return {
        "machine": machine(),
        "prompt_tokens": len(continuation),
        "extension": args.extension,
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
        "engine": f"llama-server {args.server or server_binary()}",
        "model": Path(model).name,
    }


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
