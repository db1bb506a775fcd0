"""docs/bench.png from a suite result: throughput of every system, per dataset.

.venv/bin/python tools/bench/plot.py docs/bench/suite-<stamp>.json [--out docs/bench.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DOCS

# (label, write key, read key) in the order they are drawn, top to bottom.
SYSTEMS: list[tuple[str, str, str]] = [
    ("ceiling: loopback TCP", "tcp", "tcp"),
    ("ceiling: one file (write+fsync / read)", "file_write", "file_read"),
    ("redis-py SET / GET (LMCache redis://)", "redis_set", "redis_get"),
    ("slot file save / restore (llama.cpp)", "slot_save", "slot_restore"),
    ("cwm freeze (fsync) / thaw from memory, 1 stream", "freeze_1", "thaw_memory_1"),
    ("cwm freeze (fsync) / thaw from memory, N streams", "freeze_n", "thaw_memory_n"),
    ("cwm thaw from disk (restarted), 1 stream", "", "thaw_disk_1"),
    ("cwm thaw from disk (restarted), N streams", "", "thaw_disk_n"),
    (
        "cwm freeze without fsync / disk tier read in-process",
        "freeze_1_no_fsync",
        "disk_read_verified_1",
    ),
]


def _mib_s(results: dict[str, Any], key: str) -> float:
    entry = results.get(key) if key else None
    return float(entry["mib_s"]) if isinstance(entry, dict) and "mib_s" in entry else 0.0


def plot(record: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = record["datasets"]
    fig, axes = plt.subplots(
        1, len(datasets), figsize=(7 * len(datasets), 5.2), sharey=True, squeeze=False
    )
    labels = [label for label, _, _ in SYSTEMS]
    positions = range(len(SYSTEMS))
    for ax, (name, data) in zip(axes[0], datasets.items(), strict=True):
        systems = data["systems"]
        writes = [_mib_s(systems, w) for _, w, _ in SYSTEMS]
        reads = [_mib_s(systems, r) for _, _, r in SYSTEMS]
        height = 0.38
        ax.barh(
            [p - height / 2 for p in positions],
            writes,
            height,
            label="write / save / freeze",
            color="#4c72b0",
        )
        ax.barh(
            [p + height / 2 for p in positions],
            reads,
            height,
            label="read / restore / thaw",
            color="#dd8452",
        )
        for p, (w, r) in enumerate(zip(writes, reads, strict=True)):
            if w:
                ax.text(w, p - height / 2, f" {w:.0f}", va="center", fontsize=7)
            if r:
                ax.text(r, p + height / 2, f" {r:.0f}", va="center", fontsize=7)
        ax.set_xlim(0, max(writes + reads) * 1.12)  # room for the labels at the bar ends
        ax.set_title(f"{name}: {data['description']}", fontsize=8)
        ax.set_xlabel("MiB/s (median run; higher is better)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(list(positions))
    axes[0][0].set_yticklabels(labels, fontsize=8)
    axes[0][0].invert_yaxis()
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, fontsize=8)  # below, over no bar
    fig.suptitle(
        f"cwm vs plain TCP, plain files, redis-py and slot files, same bytes, one run "
        f"({record['date'][:10]}, {record['machine_short']})",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("result", type=Path)
    parser.add_argument("--out", type=Path, default=DOCS / "bench.png")
    args = parser.parse_args()
    plot(json.loads(args.result.read_text()), args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
