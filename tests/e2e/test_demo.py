"""`cwm demo` as `make demo` runs it: real processes, exit code 0 only when identical."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def test_demo_continues_identically_on_another_node(tiny_model_dir: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cwm_server.cli.main",
            "demo",
            "--json",
            "--tokens",
            "2048",
            "--model",
            str(tiny_model_dir),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["identical_continuation"] is True
    assert summary["continuation_tokens"] == 32
    assert summary["cached_tokens_after_thaw"] == summary["tokens"] >= 2048
    assert summary["chunks"] == -(-summary["tokens"] // 256)


def test_synthetic_demo_survives_a_manager_restart() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cwm_server.cli.main", "demo", "--synthetic", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["identical_after_restart"] is True
    assert summary["stored_bytes"] < summary["raw_bytes"]  # KV-like bf16 compresses
