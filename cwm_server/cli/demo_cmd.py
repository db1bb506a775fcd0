"""`cwm demo`: a session's KV leaves one engine and continues in another, bit for bit.

Everything runs as real processes on loopback, on the embedded default (no Redis, no GPU, no
network): a manager (`cwm serve`) on a scratch data dir and two reference-engine agents,
node-a and node-b (`cwm agent`). A conversation of a few thousand tokens runs on node-a
through its OpenAI-style HTTP endpoint; the session is frozen, thawed onto node-b, and the
next turn is sent to both: node-a continuing its own session is the uninterrupted run,
node-b continues from the thawed KV. `identical continuation` compares their greedy tokens;
the exit code is 0 only if they are equal.

`--synthetic` runs the manager-only demo instead (freeze synthetic KV, restart, thaw,
compare), which needs no model.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from cwm_client import SessionClient, WindowClient, chunks_from_bytes, pb
from cwm_client.chunks import bytes_per_token
from cwm_server.cli.options import Subparsers, add_command
from cwm_server.cli.render import human_bytes, print_json
from cwm_server.manager.config import default_data_dir

SYNTHETIC_FINGERPRINT = pb.ModelFingerprint(
    model_id="demo-synthetic",
    kv_dtype=pb.KvDtype.KV_DTYPE_BFLOAT16,
    num_layers=4,
    num_kv_heads=2,
    head_dim=32,
    engine_name="synthetic",
    engine_version="0",
    block_size=16,
)

USER_TURNS = [
    "Let us plan a long trip along the coast. The first leg goes north through small fishing "
    "towns, where the roads are narrow and the weather changes every hour. ",
    "The second leg crosses the mountains. We will need warm clothes, a map of the passes, "
    "and a list of the huts that stay open in the autumn. ",
    "For the third leg we take the train along the river valley and stop in every town that "
    "has a market, a bridge, or an old library worth a visit. ",
    "Finally we return by ferry. Write down what we learned, what we would change, and what "
    "we would pack differently next time. ",
]


class _Process:
    """A `cwm` subcommand as a child process, stopped with SIGTERM."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as handle:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cwm_server.cli.main", *args],
                stdout=handle,
                stderr=handle,
            )

    def check_alive(self, what: str) -> None:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise SystemExit(f"demo: {what} exited early:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _start_manager(scratch: Path) -> tuple[_Process, str]:
    port_file = scratch / "manager.port"
    manager = _Process(
        [
            "serve",
            "--data-dir",
            str(scratch / "data"),
            "--listen",
            "127.0.0.1:0",
            "--port-file",
            str(port_file),
            "--log-level",
            "WARNING",
        ],
        scratch / "manager.log",
    )
    deadline = time.monotonic() + 60
    while not port_file.exists():
        manager.check_alive("the manager")
        if time.monotonic() > deadline:
            raise SystemExit("demo: the manager did not start within 60 s")
        time.sleep(0.05)
    return manager, f"127.0.0.1:{port_file.read_text()}"


def _complete(endpoint: str, **body: Any) -> tuple[dict[str, Any], float]:
    request = urllib.request.Request(
        f"{endpoint}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        reply = json.loads(response.read())
    return reply, time.perf_counter() - started


def _user_tokens(endpoint: str, text: str) -> list[int]:
    """Tokenize through the engine (a request without a cache_salt keeps nothing)."""
    reply, _ = _complete(endpoint, prompt=text, max_tokens=1, return_token_ids=True)
    ids: list[int] = reply["choices"][0]["prompt_token_ids"]
    return ids


def _conversation(endpoint: str, salt: str, target_tokens: int) -> list[int]:
    """Turns of user text and greedy replies on `salt` until the context has about
    `target_tokens` tokens; returns the token ids of the whole conversation so far."""
    context: list[int] = []
    turn = 0
    while len(context) < target_tokens:
        text = USER_TURNS[turn % len(USER_TURNS)] * 4
        user = _user_tokens(endpoint, text)
        if context:
            user = user[1:]  # the BOS token only opens the conversation
        prompt = (context + user)[:target_tokens]
        reply, _ = _complete(endpoint, prompt=prompt, cache_salt=salt, max_tokens=48, temperature=0)
        context = prompt + reply["choices"][0]["token_ids"]
        turn += 1
    return context


def _wait_agents(target: str, agents: dict[str, _Process], timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    with SessionClient(target) as sessions:
        while True:
            for name, proc in agents.items():
                proc.check_alive(f"agent {name}")
            found = {a.agent_id: a.endpoint for a in sessions.list_agents()}
            if set(agents) <= set(found):
                return found
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: agents did not connect within {timeout:.0f} s")
            time.sleep(0.2)


def run_engine_demo(model: str, context_tokens: int) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="cwm-demo-"))
    processes: list[_Process] = []
    try:
        manager, target = _start_manager(scratch)
        processes.append(manager)
        agents = {
            name: _Process(
                [
                    "agent",
                    "--manager",
                    target,
                    "--agent-id",
                    name,
                    "--model",
                    model,
                    "--http",
                    "127.0.0.1:0",
                    "--log-level",
                    "WARNING",
                ],
                scratch / f"{name}.log",
            )
            for name in ("node-a", "node-b")
        }
        processes.extend(agents.values())
        endpoints = _wait_agents(target, agents, timeout=300)
        node_a, node_b = endpoints["node-a"], endpoints["node-b"]

        salt = secrets.token_hex(32)
        context = _conversation(node_a, salt, context_tokens)
        next_turn = context + _user_tokens(node_a, USER_TURNS[0])[1:33]
        with SessionClient(target) as sessions:
            while not any(s.session_id == salt for s in sessions.list_sessions("node-a")):
                time.sleep(0.05)
            started = time.perf_counter()
            frozen = sessions.freeze_session(salt, "demo-window", description="cwm demo")
            freeze_s = time.perf_counter() - started
            started = time.perf_counter()
            thawed = sessions.thaw_window("demo-window", agent_id="node-b")
            thaw_s = time.perf_counter() - started

        # Time to first token on node-b: from the thawed session vs recomputing everything.
        first_b, ttft_thawed = _complete(
            node_b, prompt=next_turn, cache_salt=thawed.cache_salt, max_tokens=1, temperature=0
        )
        _, ttft_recompute = _complete(
            node_b,
            prompt=next_turn,
            cache_salt=secrets.token_hex(32),
            max_tokens=1,
            temperature=0,
        )
        # The same next turn, greedy, on the uninterrupted session and on the thawed one.
        _complete(node_a, prompt=next_turn, cache_salt=salt, max_tokens=1, temperature=0)
        reply_a, _ = _complete(
            node_a, prompt=next_turn, cache_salt=salt, max_tokens=32, temperature=0
        )
        reply_b, _ = _complete(
            node_b, prompt=next_turn, cache_salt=thawed.cache_salt, max_tokens=32, temperature=0
        )
        tokens_a = reply_a["choices"][0]["token_ids"]
        tokens_b = reply_b["choices"][0]["token_ids"]
        window = frozen.window
        return {
            "tokens": window.token_count,
            "chunks": window.chunk_count,
            "raw_bytes": window.raw_bytes,
            "stored_bytes": window.stored_bytes,
            "freeze_seconds": round(freeze_s, 3),
            "thaw_seconds": round(thaw_s, 3),
            "cached_tokens_after_thaw": first_b["usage"]["prompt_tokens_details"]["cached_tokens"],
            "ttft_after_thaw_seconds": round(ttft_thawed, 4),
            "ttft_recompute_seconds": round(ttft_recompute, 4),
            "ttft_speedup": round(ttft_recompute / ttft_thawed, 1),
            "thaw_plus_ttft_speedup": round(ttft_recompute / (thaw_s + ttft_thawed), 1),
            "continuation_tokens": len(tokens_b),
            "identical_continuation": tokens_a == tokens_b and len(tokens_b) == 32,
        }
    finally:
        for process in reversed(processes):
            process.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def run_synthetic_demo(tokens: int) -> dict[str, Any]:
    """Manager only: freeze synthetic KV, restart the manager, thaw, compare."""
    scratch = Path(tempfile.mkdtemp(prefix="cwm-demo-"))
    rng = np.random.default_rng(7)
    per_token = bytes_per_token(SYNTHETIC_FINGERPRINT)
    pieces = []
    for start in range(0, tokens, 256):
        values = rng.standard_normal(per_token * min(256, tokens - start) // 2)
        pieces.append((values.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes())
    chunks = chunks_from_bytes(pieces, 256, tokens)
    manager, target = _start_manager(scratch)
    try:
        with WindowClient(target) as client:
            started = time.perf_counter()
            result = client.freeze(
                "demo-window",
                chunks,
                fingerprint=SYNTHETIC_FINGERPRINT,
                token_ids=list(range(tokens)),
            )
            freeze_s = time.perf_counter() - started
        manager.stop()
        (scratch / "manager.port").unlink()
        manager, target = _start_manager(scratch)
        with WindowClient(target) as client:
            started = time.perf_counter()
            with client.thaw("demo-window") as stream:
                thawed = [c.data for c in stream]
            thaw_s = time.perf_counter() - started
        return {
            "tokens": tokens,
            "chunks": result.window.chunk_count,
            "raw_bytes": result.window.raw_bytes,
            "stored_bytes": result.window.stored_bytes,
            "freeze_seconds": round(freeze_s, 3),
            "thaw_after_restart_seconds": round(thaw_s, 3),
            "identical_after_restart": thawed == pieces,
        }
    finally:
        manager.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def _print_table(title: str, summary: dict[str, Any]) -> None:
    print(title)
    for key, value in summary.items():
        if key.endswith("bytes"):
            value = f"{value} ({human_bytes(int(value))})"
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        elif key.endswith("speedup"):
            value = f"{value}x"
        print(f"  {key.replace('_', ' '):<28} {value}")


HEADROOM_TOKENS = 48 + 32 + 32
"""What the demo adds after `--tokens` of context: the last reply (up to 48), the next
user turn (32) and the compared continuation (32)."""


def model_positions(model: str) -> int | None:
    """The model's context length from its config.json (None if it does not say)."""
    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) else None


def tokens_problem(tokens: int, positions: int | None) -> str:
    """Why `--tokens` cannot run on a model of `positions` ("" if it can)."""
    if tokens < 1:
        return f"--tokens must be at least 1, got {tokens}"
    if positions is not None and tokens + HEADROOM_TOKENS > positions:
        return (
            f"--tokens {tokens} does not fit: the model takes {positions} positions and the "
            f"demo adds up to {HEADROOM_TOKENS} tokens after the context; use --tokens "
            f"{positions - HEADROOM_TOKENS} or less"
        )
    return ""


def cmd_demo(args: argparse.Namespace) -> int:
    if args.synthetic:
        problem = tokens_problem(args.tokens, None)
    elif args.model is not None:
        problem = tokens_problem(args.tokens, model_positions(args.model))
    else:
        from cwm_server.agent.engines.reference.tiny_model import RECIPE

        problem = tokens_problem(args.tokens, int(RECIPE["max_position_embeddings"]))
    if problem:  # before two agents and a model are started, not minutes after
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.synthetic:
        summary = run_synthetic_demo(args.tokens)
        verdict = bool(summary["identical_after_restart"])
        title = "cwm demo (manager only): freeze -> restart -> thaw -> compare"
    else:
        model = args.model or str(default_data_dir() / "models" / "tiny-llama")
        if args.model is None:
            from cwm_server.agent.engines.reference.tiny_model import ensure_tiny_model

            ensure_tiny_model(model)
        summary = run_engine_demo(model, args.tokens)
        verdict = bool(summary["identical_continuation"])
        title = "cwm demo: conversation on node-a -> freeze -> thaw on node-b -> continue"
    if args.json:
        print_json(summary)
    else:
        _print_table(title, summary)
    return 0 if verdict else 1


def add_parser(sub: Subparsers) -> None:
    demo = add_command(sub, "demo", help="run the end-to-end demo on a scratch data dir")
    demo.add_argument("--tokens", type=int, default=3072, help="context tokens before the freeze")
    demo.add_argument(
        "--model", help="model directory (default: the built-in tiny Llama, built on first use)"
    )
    demo.add_argument("--synthetic", action="store_true", help="manager-only demo, no model")
    demo.set_defaults(handler=cmd_demo, needs_client=False)
