"""Freeze and thaw at a real model's KV size, end to end through vLLM's paged cache.

A random-weight Llama with Llama-3.1-8B's KV geometry (32 layers, 8 KV heads x 128, bf16:
128 KiB of KV per token) and a small hidden size, so vLLM's CPU build runs it here. All real
processes on loopback: a manager (`cwm serve`), two vLLM servers with the connector (A on
core 0, B on core 1) and an agent beside each (`cwm agent --engine vllm`). For each window
size (`--tokens`):

- a session of that many tokens is built on A (its prefill time is A's recompute);
- freeze: the order to A's agent until the window is committed (vLLM's cache -> connector ->
  agent -> manager), as GB/s of the window's canonical bytes;
- thaw: the order to B's agent until the blocks are in B's paged cache (manager -> agent ->
  shared-memory staging -> connector -> cache, verified), while a streaming request runs on
  B: its inter-token latency during the load against before it;
- TTFT on B continuing the thawed session against the same prompt under a fresh salt;
- the proof that bytes, not only tokens, arrived: B's session is frozen back out of B's
  paged cache (through the layout mapping) and every chunk digest equals A's window's.

With `--compare-sync`, B is restarted with `cwm_async_load: false` and the largest window's
thaw and inter-token latency are measured again (loads inside vLLM's step). The machine's
memcpy and loopback TCP are measured in the same run, and every figure is also a ratio.

    .venv-vllm/bin/python tools/bench/vllm_geometry.py --tokens 4096 --synthetic 16384 \
        --compare-sync                                   # a stream timed on B during each thaw
    .venv-vllm/bin/python tools/bench/vllm_geometry.py --tokens --synthetic 4096 16384 \
        --itl-tokens 0                                   # the thaw alone, B idle

`--tokens` are real sessions prefilled on A (4096 tokens take about 150 s on one core here);
`--synthetic` windows hold random KV with B's fingerprint, frozen straight into the manager,
for sizes whose prefill would take too long. `--warm-up` thaws each synthetic window once,
unmeasured, first, so the agent's staging pool holds its chunk files (as on a host that has
thawed before; pass `--agent-args "--vllm-keep-seconds 0"` with it, or the warm-up's window
stays kept and its files out of the pool). `--transfer-cpus` sets the connector's
`cwm_transfer_cpus` on both servers.

The 2026-12-04 (second) figures in docs/BENCHMARKS.md came from

    .venv-vllm/bin/python tools/bench/vllm_geometry.py --tokens 4096 --synthetic 16384 \
        --compare-sync --warm-up --agent-args "--vllm-keep-seconds 0"      # run 3
    .venv-vllm/bin/python tools/bench/vllm_geometry.py --tokens 16384 --synthetic \
        --itl-tokens 0                                   # run 4: a real 16k session
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ManagerProcess, MiB, free_port, machine, timed
from peers import tcp_loopback

from cwm_client import SessionClient, WindowClient
from cwm_server.agent.engines.reference.tiny_model import RECIPE, ensure_tiny_model
from cwm_server.agent.engines.vllm.launch import VllmServer, complete_greedy

GiB = 1 << 30
LLAMA3_8B_KV = dict(
    RECIPE,
    num_hidden_layers=32,
    num_attention_heads=8,
    num_key_value_heads=8,
    head_dim=128,
    hidden_size=256,
    intermediate_size=512,
    max_position_embeddings=32768,
)
BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2


AGENT_ARGS: list[str] = []
"""More `cwm agent` options for both agents (`--agent-args`)."""


def _agent(manager: str, server: VllmServer, agent_id: str, log: Path) -> Any:
    import subprocess

    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cwm_server.cli.main",
            *server.agent_args(agent_id, manager),
            "--log-level",
            "INFO",
            *AGENT_ARGS,
        ],
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
    )


def _wait_agent(sessions: SessionClient, agent_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(a.agent_id == agent_id for a in sessions.list_agents()):
            return
        time.sleep(0.2)
    raise TimeoutError(f"agent {agent_id} did not connect")


def _wait_session(sessions: SessionClient, agent: str, session: str, tokens: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if any(
            s.session_id == session and s.token_count >= tokens
            for s in sessions.list_sessions(agent)
        ):
            return
        time.sleep(0.2)
    raise TimeoutError(f"session {session} was not reported by {agent}")


class TokenClock:
    """A streaming completion on a server; records when each token arrives."""

    def __init__(self, url: str, model: str, prompt: list[int], tokens: int) -> None:
        self.times: list[float] = []
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "cache_salt": f"itl-{time.monotonic_ns()}",
        }
        self._request = urllib.request.Request(
            f"{url}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with urllib.request.urlopen(self._request, timeout=900) as reply:
            for line in reply:
                if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                    self.times.append(time.perf_counter())

    def start(self, after_tokens: int) -> TokenClock:
        self._thread.start()
        while len(self.times) < after_tokens and self._thread.is_alive():
            time.sleep(0.01)
        return self

    def join(self) -> None:
        self._thread.join()

    def gaps(self, start: float, end: float) -> list[float]:
        """Inter-token gaps (ms) of tokens that arrived in [start, end]."""
        return [
            (b - a) * 1000
            for a, b in zip(self.times, self.times[1:], strict=False)
            if start <= b <= end
        ]


def _percentiles(gaps: list[float]) -> dict[str, float]:
    if not gaps:
        return {"count": 0}
    return {
        "count": len(gaps),
        "p50_ms": round(float(np.percentile(gaps, 50)), 1),
        "p99_ms": round(float(np.percentile(gaps, 99)), 1),
        "max_ms": round(max(gaps), 1),
    }


def _thaw_with_clock(
    sessions: SessionClient, b: VllmServer, model: str, window: str, salt: str, itl_tokens: int
) -> dict[str, Any]:
    if itl_tokens <= 0:  # the thaw alone, nothing else running on B
        started = time.perf_counter()
        sessions.thaw_window(window, agent_id="bench-b", new_session_id=salt)
        return {"thaw_order_s": round(time.perf_counter() - started, 3)}
    clock = TokenClock(b.url, model, [int(t) for t in range(100, 228)], itl_tokens).start(16)
    before_start = time.perf_counter()
    time.sleep(2.0)
    started = time.perf_counter()
    sessions.thaw_window(window, agent_id="bench-b", new_session_id=salt)
    ended = time.perf_counter()
    clock.join()
    return {
        "thaw_order_s": round(ended - started, 3),
        "itl_before": _percentiles(clock.gaps(before_start, started)),
        "itl_during": _percentiles(clock.gaps(started, ended)),
        "itl_after": _percentiles(clock.gaps(ended, clock.times[-1] if clock.times else ended)),
    }


def _ttft_ms(url: str, served: str, prompt: list[int], salt: str, cached: int) -> float:
    """Latency of a `max_tokens=1` request (prefill plus one token), checking that vLLM
    served exactly `cached` of its prompt tokens from its cache."""
    t0 = time.perf_counter()
    reply = complete_greedy(url, served, prompt, salt, timeout=1800)
    elapsed = (time.perf_counter() - t0) * 1000
    got = reply["usage"]["prompt_tokens_details"]["cached_tokens"] or 0
    if got != cached:
        raise AssertionError(f"{salt}: {got} cached tokens, {cached} expected")
    return round(elapsed, 1)


def _read_back(
    sessions: SessionClient, windows: WindowClient, window: str, salt: str
) -> tuple[float, bool]:
    """Freeze B's session `salt` back out of B's paged cache (through the layout mapping):
    (seconds, whether every chunk digest equals `window`'s)."""
    t0 = time.perf_counter()
    sessions.freeze_session(salt, f"{window}-from-b", agent_id="bench-b")
    seconds = time.perf_counter() - t0
    ours = [c.digest for c in windows.get(window).chunks]
    back = [c.digest for c in windows.get(f"{window}-from-b").chunks]
    return round(seconds, 3), ours == back


def _synthetic_row(
    sessions: SessionClient,
    windows: WindowClient,
    b: VllmServer,
    served: str,
    fingerprint: Any,
    tokens: int,
    args: argparse.Namespace,
    ceilings: dict[str, float],
) -> dict[str, Any]:
    """A window of random KV with B's fingerprint, frozen straight into the manager, then
    thawed into B (thaw speed, inter-token latency, TTFT with thaw, bytes check)."""
    from cwm_client import chunks_from_bytes

    rng = np.random.default_rng(tokens)
    window_tokens = tokens // 128 * 128
    span = 256
    datas = [
        rng.integers(0, 1 << 16, size=min(span, window_tokens - s) * BYTES_PER_TOKEN // 2)
        .astype("<u2")
        .view(np.int16)
        # Finite bf16 values: clear the exponent's top bit.
        .__and__(np.int16(0x3FFF))
        .tobytes()
        for s in range(0, window_tokens, span)
    ]
    token_ids = [int(t) for t in rng.integers(16, 2048, size=window_tokens)]
    name = f"syn-{tokens}"
    windows.freeze(
        name,
        chunks_from_bytes(datas, span, window_tokens),
        fingerprint=fingerprint,
        token_ids=token_ids,
        chunk_tokens=span,
        session_id=name,
        cache_salt=name,
    )
    del datas
    row: dict[str, Any] = {"tokens": tokens, "synthetic": True}
    if args.warm_up:
        # Once first, unmeasured: the agent's staging pool then holds this window's files.
        warm = _thaw_with_clock(sessions, b, served, name, f"warm-{name}", 0)
        row["warm_up_thaw_s"] = warm["thaw_order_s"]
    window_bytes = window_tokens * BYTES_PER_TOKEN
    row["window_gib"] = round(window_bytes / GiB, 3)
    thaw = _thaw_with_clock(sessions, b, served, name, f"t-{name}", args.itl_tokens)
    row.update(thaw)
    row["thaw_gb_s"] = round(window_bytes / thaw["thaw_order_s"] / 1e9, 3)
    row["thaw_vs_tcp"] = round(row["thaw_gb_s"] / ceilings["tcp_loopback_gb_s"], 3)
    continuation = token_ids + [int(t) for t in rng.integers(16, 2048, size=32)]
    row["ttft_thaw_ms"] = _ttft_ms(b.url, served, continuation, f"t-{name}", window_tokens)
    row["freeze_from_b_s"], row["b_cache_equals_a_chunks"] = _read_back(
        sessions, windows, name, f"t-{name}"
    )
    row["freeze_gb_s"] = round(window_bytes / row["freeze_from_b_s"] / 1e9, 3)
    row["freeze_vs_tcp"] = round(row["freeze_gb_s"] / ceilings["tcp_loopback_gb_s"], 3)
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="cwm-vllm-geometry-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_tiny_model(work / "llama3-8b-kv", LLAMA3_8B_KV)
    longest = max([*args.tokens, *args.synthetic])
    kv_gib = int(np.ceil((longest + 1024) * BYTES_PER_TOKEN / GiB)) + 1
    max_len = longest + 1024

    pieces = [np.random.default_rng(1).bytes(32 * MiB) for _ in range(8)]
    tcp = tcp_loopback(pieces, 3)
    source = np.frombuffer(b"".join(pieces), dtype=np.uint8)
    target = np.empty_like(source)
    memcpy = timed(lambda: np.copyto(target, source), source.nbytes / MiB, 3)
    ceilings = {
        "tcp_loopback_gb_s": tcp.mib_s * MiB / 1e9,
        "memcpy_gb_s": memcpy.mib_s * MiB / 1e9,
    }

    def server(name: str, cpu: str, options: dict[str, Any] | None = None) -> VllmServer:
        return VllmServer(
            model_dir,
            free_port(),
            work / f"cwm-{name}",
            work / f"vllm-{name}.log",
            cpu=cpu,
            kv_cache_gib=kv_gib,
            max_model_len=max_len,
            connector_options={"cwm_transfer_cpus": args.transfer_cpus, **(options or {})},
        )

    manager = ManagerProcess(work / "data").start()
    procs: list[Any] = []
    servers: list[VllmServer] = []
    results: dict[str, Any] = {
        "machine": machine(),
        "model": "random-weight Llama, Llama-3.1-8B KV geometry (32 x 8 x 128, bf16), hidden 256",
        "kv_cache_gib_per_server": kv_gib,
        "transfer_cpus": args.transfer_cpus,
        "ceilings": {k: round(v, 3) for k, v in ceilings.items()},
        "windows": [],
    }
    try:
        a, b = server("a", "0"), server("b", "1")
        servers += [a, b]
        started = time.monotonic()
        a.launch()
        b.launch()
        a.wait_ready(600)
        b.wait_ready(600)
        results["vllm_startup_s"] = round(time.monotonic() - started, 1)
        procs.append(_agent(manager.target, a, "bench-a", work / "agent-a.log"))
        procs.append(_agent(manager.target, b, "bench-b", work / "agent-b.log"))
        sessions = SessionClient(manager.target)
        windows = WindowClient(manager.target)
        _wait_agent(sessions, "bench-a")
        _wait_agent(sessions, "bench-b")
        with urllib.request.urlopen(f"{a.url}/v1/models", timeout=30) as reply:
            served = json.loads(reply.read())["data"][0]["id"]
        rng = np.random.default_rng(20240917)
        for tokens in args.tokens:
            row: dict[str, Any] = {"tokens": tokens}
            context = [int(t) for t in rng.integers(16, 2048, size=tokens)]
            t0 = time.perf_counter()
            first = complete_greedy(
                a.url, served, context, f"s-{tokens}", return_token_ids=True, timeout=1800
            )
            row["prefill_on_a_s"] = round(time.perf_counter() - t0, 2)
            history = context + list(first["choices"][0]["token_ids"])
            window_tokens = tokens // 128 * 128
            window_bytes = window_tokens * BYTES_PER_TOKEN
            row["window_gib"] = round(window_bytes / GiB, 3)
            _wait_session(sessions, "bench-a", f"s-{tokens}", window_tokens)
            t0 = time.perf_counter()
            sessions.freeze_session(f"s-{tokens}", f"w-{tokens}", agent_id="bench-a")
            freeze_s = time.perf_counter() - t0
            row["freeze_s"] = round(freeze_s, 3)
            row["freeze_gb_s"] = round(window_bytes / freeze_s / 1e9, 3)
            thaw = _thaw_with_clock(
                sessions, b, served, f"w-{tokens}", f"t-{tokens}", args.itl_tokens
            )
            row.update(thaw)
            row["thaw_gb_s"] = round(window_bytes / thaw["thaw_order_s"] / 1e9, 3)
            continuation = history + [int(t) for t in rng.integers(16, 2048, size=32)]
            row["ttft_thaw_ms"] = _ttft_ms(
                b.url, served, continuation, f"t-{tokens}", window_tokens
            )
            # The read-back before the recompute: recomputing the prompt under a fresh salt
            # fills B's cache with a second copy of the window, which can evict blocks of
            # the thawed one (then the read-back re-reads B's recomputed KV, not A's).
            row["freeze_from_b_s"], row["b_cache_equals_a_chunks"] = _read_back(
                sessions, windows, f"w-{tokens}", f"t-{tokens}"
            )
            row["ttft_recompute_ms"] = _ttft_ms(b.url, served, continuation, f"cold-{tokens}", 0)
            row["ttft_speedup"] = round(row["ttft_recompute_ms"] / row["ttft_thaw_ms"], 1)
            row["thaw_vs_tcp"] = round(row["thaw_gb_s"] / ceilings["tcp_loopback_gb_s"], 3)
            row["freeze_vs_tcp"] = round(row["freeze_gb_s"] / ceilings["tcp_loopback_gb_s"], 3)
            results["windows"].append(row)
            print(json.dumps(row), flush=True)
        fingerprint = next(a.fingerprint for a in sessions.list_agents() if a.agent_id == "bench-b")
        for tokens in args.synthetic:
            results["windows"].append(
                _synthetic_row(sessions, windows, b, served, fingerprint, tokens, args, ceilings)
            )
            print(json.dumps(results["windows"][-1]), flush=True)
        largest = f"w-{longest}" if longest in args.tokens else f"syn-{longest}"
        if args.compare_sync:
            b.stop()
            procs[1].terminate()
            procs[1].wait(timeout=30)
            sync_b = server("b-sync", "1", {"cwm_async_load": False})
            servers.append(sync_b)
            sync_b.start(600)
            procs.append(_agent(manager.target, sync_b, "bench-b", work / "agent-b-sync.log"))
            time.sleep(1)
            _wait_agent(sessions, "bench-b")
            thaw = _thaw_with_clock(
                sessions, sync_b, served, largest, f"sync-{longest}", args.itl_tokens
            )
            thaw["tokens"] = longest
            thaw["thaw_gb_s"] = round(
                longest // 128 * 128 * BYTES_PER_TOKEN / thaw["thaw_order_s"] / 1e9, 3
            )
            results["sync_load"] = thaw
            print(json.dumps(thaw), flush=True)
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except Exception:  # noqa: BLE001
                    proc.kill()
        for srv in servers:
            srv.stop()
        manager.stop()
        if not args.work_dir:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="*", default=[4096])
    parser.add_argument(
        "--synthetic",
        type=int,
        nargs="*",
        default=[16384],
        help="windows of random KV thawed into B (no prefill on A: at 16k tokens it would take "
        "most of an hour on one core here)",
    )
    parser.add_argument(
        "--itl-tokens",
        type=int,
        default=700,
        help="tokens of the stream timed on B during each thaw (0: thaw with B idle)",
    )
    parser.add_argument("--compare-sync", action="store_true")
    parser.add_argument(
        "--warm-up",
        action="store_true",
        help="thaw each synthetic window once, unmeasured, before the measured thaw",
    )
    parser.add_argument(
        "--agent-args", default="", help="more `cwm agent` options for both agents, one string"
    )
    parser.add_argument(
        "--transfer-cpus",
        default="auto",
        help="the connector's cwm_transfer_cpus on both servers (auto, inherit, or a CPU list)",
    )
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args()
    AGENT_ARGS.extend(args.agent_args.split())
    result = run(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
