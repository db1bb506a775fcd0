"""`cwm demo`: the manager end to end on the embedded default (no Redis, no GPU, no network).

It starts a real `cwm serve` subprocess on a scratch data dir, freezes a synthetic window of
KV-shaped bytes through the SDK, stops the manager, starts a new one on the same directory,
thaws the window and compares every chunk's digest with what was frozen, then clones and
exports it. Exit code 0 only if the thawed bytes are identical.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cwm_client import WindowClient, chunks_from_bytes, pb
from cwm_client.chunks import bytes_per_token
from cwm_server.cli.options import Subparsers, add_command
from cwm_server.cli.render import human_bytes, print_json

DEMO_FINGERPRINT = pb.ModelFingerprint(
    model_id="demo-synthetic",
    kv_dtype=pb.KvDtype.KV_DTYPE_BFLOAT16,
    num_layers=4,
    num_kv_heads=2,
    head_dim=32,
    engine_name="synthetic",
    engine_version="0",
    block_size=16,
)


def _synthetic_kv(tokens: int, chunk_tokens: int) -> list[bytes]:
    """bf16 words with a realistic exponent spread, so compression has something to find."""
    rng = np.random.default_rng(7)
    per_token = bytes_per_token(DEMO_FINGERPRINT)
    pieces = []
    for start in range(0, tokens, chunk_tokens):
        count = min(chunk_tokens, tokens - start)
        values = rng.standard_normal(per_token * count // 2).astype(np.float32)
        pieces.append((values.view(np.uint32) >> 16).astype("<u2").tobytes())
    return pieces


class _Manager:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port_file = data_dir.parent / "manager.port"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        self.port_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cwm_server.cli.main",
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--listen",
                "127.0.0.1:0",
                "--port-file",
                str(self.port_file),
                "--log-level",
                "WARNING",
            ],
        )
        deadline = time.monotonic() + 30
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("demo: the manager did not start")
            time.sleep(0.05)
        return f"127.0.0.1:{self.port_file.read_text()}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)


def cmd_demo(args: argparse.Namespace) -> int:
    scratch = Path(tempfile.mkdtemp(prefix="cwm-demo-"))
    manager = _Manager(scratch / "data")
    try:
        tokens, chunk_tokens = args.tokens, 256
        pieces = _synthetic_kv(tokens, chunk_tokens)
        chunks = chunks_from_bytes(pieces, chunk_tokens, tokens)
        token_ids = list(range(tokens))
        target = manager.start()
        with WindowClient(target) as client:
            started = time.perf_counter()
            result = client.freeze(
                "demo-window",
                chunks,
                fingerprint=DEMO_FINGERPRINT,
                token_ids=token_ids,
                session_id="demo-session",
                description="cwm demo window",
            )
            freeze_s = time.perf_counter() - started
        manager.stop()
        target = manager.start()
        with WindowClient(target) as client:
            started = time.perf_counter()
            with client.thaw("demo-window") as stream:
                window = stream.window
                thawed = list(stream)
            thaw_s = time.perf_counter() - started
            started = time.perf_counter()
            client.clone("demo-window", "demo-branch")
            clone_ms = (time.perf_counter() - started) * 1000
        identical = [c.data for c in thawed] == pieces and list(window.token_ids) == token_ids
        summary = {
            "tokens": tokens,
            "chunks": result.window.chunk_count,
            "raw_bytes": result.window.raw_bytes,
            "stored_bytes": result.window.stored_bytes,
            "freeze_seconds": round(freeze_s, 4),
            "thaw_after_restart_seconds": round(thaw_s, 4),
            "clone_milliseconds": round(clone_ms, 2),
            "identical_after_restart": identical,
        }
        if args.json:
            print_json(summary)
        else:
            print("cwm demo: freeze -> restart the manager -> thaw -> compare")
            for key, value in summary.items():
                if key.endswith("bytes"):
                    value = f"{value} ({human_bytes(int(value))})"
                elif key == "identical_after_restart":
                    value = "yes" if value else "NO"
                print(f"  {key:<28} {value}")
        return 0 if identical else 1
    finally:
        manager.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def add_parser(sub: Subparsers) -> None:
    demo = add_command(sub, "demo", help="run the end-to-end demo on a scratch data dir")
    demo.add_argument("--tokens", type=int, default=4096, help="tokens in the demo window")
    demo.set_defaults(handler=cmd_demo, needs_client=False)
