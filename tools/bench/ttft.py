"""Time to first token after a thaw vs recomputing the prompt, on the demo model.

Runs the same real-process setup as `cwm demo` (a manager and two reference agents) with a
context of `--tokens` tokens (default 4096): the session is frozen on node-a and thawed onto
node-b, then the next turn's first token is timed on node-b from the thawed session and from
scratch. Appends a section to docs/BENCHMARKS.md and writes the raw numbers to docs/bench/.

    .venv/bin/python tools/bench/ttft.py [--tokens 4096] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cwm_server.agent.engines.reference.tiny_model import ensure_tiny_model  # noqa: E402
from cwm_server.cli.demo_cmd import run_engine_demo  # noqa: E402
from cwm_server.manager.config import default_data_dir  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3, help="runs; the median is reported")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    model = ensure_tiny_model(default_data_dir() / "models" / "tiny-llama")
    runs = [run_engine_demo(str(model), args.tokens) for _ in range(args.repeat)]
    median = {
        key: statistics.median(float(r[key]) for r in runs)
        for key in (
            "ttft_after_thaw_seconds",
            "ttft_recompute_seconds",
            "thaw_seconds",
            "freeze_seconds",
        )
    }
    speedup = median["ttft_recompute_seconds"] / median["ttft_after_thaw_seconds"]
    with_thaw = median["ttft_recompute_seconds"] / (
        median["ttft_after_thaw_seconds"] + median["thaw_seconds"]
    )
    identical = all(r["identical_continuation"] for r in runs)
    machine = (
        f"{platform.node()} ({os.cpu_count()} cores, {platform.machine()}, "
        f"Python {platform.python_version()}), CPU only"
    )
    stamp = datetime.now(UTC)
    record = {
        "date": stamp.isoformat(),
        "machine": machine,
        "command": " ".join(sys.argv),
        "runs": runs,
        "median": median,
        "ttft_speedup": speedup,
        "thaw_plus_ttft_speedup": with_thaw,
        "identical": identical,
    }
    print(json.dumps(record, indent=2))
    if args.no_record:
        return 0 if identical else 1
    out = ROOT / "docs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"ttft-{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    tokens = runs[0]["tokens"]
    rows = [
        ("context tokens (frozen on node-a, thawed on node-b)", f"{tokens}"),
        ("freeze (order → window committed)", f"{median['freeze_seconds'] * 1000:.0f} ms"),
        ("thaw (order → session loaded on node-b)", f"{median['thaw_seconds'] * 1000:.0f} ms"),
        ("TTFT on node-b after thaw", f"{median['ttft_after_thaw_seconds'] * 1000:.0f} ms"),
        (
            "TTFT on node-b recomputing the prompt",
            f"{median['ttft_recompute_seconds'] * 1000:.0f} ms",
        ),
        ("speedup, TTFT alone", f"{speedup:.1f}x"),
        ("speedup, thaw + TTFT", f"{with_thaw:.1f}x"),
        ("identical 32-token continuation, every run", "yes" if identical else "NO"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    section = (
        f"\n### Time to first token after thaw vs recompute, {tokens}-token context "
        f"({stamp.date()})\n\n"
        f"Command: `.venv/bin/python tools/bench/ttft.py --tokens {args.tokens} "
        f"--repeat {args.repeat}` (median of {args.repeat} runs)\n"
        f"Machine: {machine}. Model: the built-in tiny Llama (4 layers, hidden 256, bf16). "
        f"Raw numbers: `{json_path.relative_to(ROOT)}`.\n\n"
        f"| measure | value |\n|---|---|\n{table}\n"
    )
    with open(ROOT / "docs" / "BENCHMARKS.md", "a") as handle:
        handle.write(section)
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
