"""Before/after in tight alternation, with CPU time per MiB.

    git archive <rev> | tar -x -C /tmp/cwm-before
    .venv/bin/python tools/bench/ab_paired.py /tmp/cwm-before . --mib 512 --kind random \
        --measures thaw,freeze --rounds 8

Two long-lived workers, one per source tree (each a `cwm serve` with the whole window in its
memory tier and a client, both running that tree's code), take turns on every measure, the
order flipping each round, so drift on a shared machine lands on both. Each run reports MiB/s
and the manager's and the client's CPU milliseconds per MiB, which stay steadier than
throughput when other jobs share the cores. Datasets: random (1 MiB chunks of random bytes)
kv (256 KiB chunks of bf16-like words) or 8b (32 MiB chunks of random bytes, Llama-3-8B's
geometry). Measures: thaw (from the memory tier), freeze
(re-sends the same chunks: the store rewrites the same files) and freeze_fresh (bytes the
store has never seen: new chunk files, as a new session's KV). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = r"""
import json, os, resource, sys, time, subprocess, tempfile, shutil
from pathlib import Path
import numpy as np
from cwm_client import WindowClient, chunks_from_bytes, pb
try:  # as every cwm command does; a tree from before it existed runs untuned
    from cwm_client.allocator import tune_allocator
    tune_allocator()
except ImportError:
    pass
MiB = 1 << 20
mib, kind = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(11)
if kind == "kv":
    pieces = [
        (rng.standard_normal((256 << 10) // 2).astype(np.float32).view(np.uint32) >> 16)
        .astype("<u2").tobytes()
        for _ in range(mib * 4)
    ]
    heads = 1
elif kind == "8b":  # Llama-3-8B's geometry: 32 MiB chunks (the shared-memory transport's)
    pieces = [rng.integers(0, 256, 32 * MiB, dtype=np.uint8).tobytes() for _ in range(mib // 32)]
if kind == "random":
    pieces = [rng.integers(0, 256, MiB, dtype=np.uint8).tobytes() for _ in range(mib)]
    heads = 4
layers, dim = (32, 128) if kind == "8b" else (4, 64)
heads = 8 if kind == "8b" else heads
fp = pb.ModelFingerprint(model_id="ab", kv_dtype=pb.KvDtype.KV_DTYPE_BFLOAT16, num_layers=layers,
                         num_kv_heads=heads, head_dim=dim, engine_name="ab", block_size=16)
chunks = chunks_from_bytes(pieces, 256, 256 * len(pieces))
ids = [i % 32000 for i in range(256 * len(pieces))]
scratch = Path(tempfile.mkdtemp())
port = scratch / "port"
proc = subprocess.Popen([sys.executable, "-m", "cwm_server.cli.main", "serve", "--data-dir",
    str(scratch / "data"), "--listen", "127.0.0.1:0", "--port-file", str(port),
    "--log-level", "WARNING", "--memory-cache-mib", str(mib + 100)])
while not port.exists():
    time.sleep(0.05)
client = WindowClient("127.0.0.1:" + port.read_text(), timeout=600)
client.freeze("base", chunks, fingerprint=fp, token_ids=ids)
def manager_stat():
    return Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
def manager_cpu():
    fields = manager_stat()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
def manager_faults():
    return int(manager_stat()[7])
def client_cpu():
    times = os.times()
    return times.user + times.system
def client_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.strip()
    m0, c0, t0 = manager_cpu(), client_cpu(), time.perf_counter()
    mf0, cf0 = manager_faults(), client_faults()
    if cmd == "freeze_fresh":
        # Bytes the store has never seen (each run stamps its pieces), as a new session's
        # KV is: new chunk files, where "freeze" rewrites the same ones.
        runs = globals().get("runs", 0) + 1
        globals()["runs"] = runs
        stamp = runs.to_bytes(8, "little")
        fresh = chunks_from_bytes([stamp + piece[8:] for piece in pieces], 256,
                                  256 * len(pieces))
        m0, c0, t0 = manager_cpu(), client_cpu(), time.perf_counter()
        mf0, cf0 = manager_faults(), client_faults()
        client.freeze(f"fresh{runs}", fresh, fingerprint=fp, token_ids=ids)
    elif cmd == "freeze":
        client.freeze("w", chunks, fingerprint=fp, token_ids=ids, skip_existing=False,
                      replace=True)
    else:
        with client.thaw("base") as stream:
            for _ in stream:
                pass
    seconds = time.perf_counter() - t0
    print(json.dumps({"mib_s": mib / seconds, "manager_cpu_ms_per_mib":
        (manager_cpu() - m0) * 1000 / mib, "client_cpu_ms_per_mib":
        (client_cpu() - c0) * 1000 / mib, "manager_faults_per_mib":
        (manager_faults() - mf0) / mib, "client_faults_per_mib":
        (client_faults() - cf0) / mib}), flush=True)
client.close()
proc.terminate()
proc.wait()
shutil.rmtree(scratch)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--kind", choices=("random", "kv", "8b"), default="random")
    parser.add_argument("--measures", default="thaw,freeze")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    measures = args.measures.split(",")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(WORKER)
    workers = []
    try:
        for tree in (args.before.resolve(), args.after.resolve()):
            worker = subprocess.Popen(
                [sys.executable, handle.name, str(args.mib), args.kind],
                cwd=tree,
                env=dict(os.environ, PYTHONPATH=str(tree)),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
            workers.append(worker)
        runs: dict[str, list[list[dict[str, float]]]] = {m: [[], []] for m in measures}
        load_before = os.getloadavg()[0]
        for round_ in range(args.rounds):
            order = (0, 1) if round_ % 2 == 0 else (1, 0)
            for measure in measures:
                for i in order:
                    worker = workers[i]
                    assert worker.stdin is not None and worker.stdout is not None
                    worker.stdin.write(measure + "\n")
                    worker.stdin.flush()
                    runs[measure][i].append(json.loads(worker.stdout.readline()))
    finally:
        for worker in workers:
            if worker.stdin is not None:
                worker.stdin.close()
            worker.wait()
        os.unlink(handle.name)
    summary: dict[str, object] = {}
    for measure, (before, after) in runs.items():
        pairs = [a["mib_s"] / b["mib_s"] for a, b in zip(after, before, strict=True)]
        summary[measure] = {
            label: {
                "mib_s_median": round(statistics.median(r["mib_s"] for r in rs), 1),
                "manager_cpu_ms_per_mib_mean": round(
                    statistics.mean(r["manager_cpu_ms_per_mib"] for r in rs), 3
                ),
                "client_cpu_ms_per_mib_mean": round(
                    statistics.mean(r["client_cpu_ms_per_mib"] for r in rs), 3
                ),
                "manager_faults_per_mib_mean": round(
                    statistics.mean(r["manager_faults_per_mib"] for r in rs), 1
                ),
                "client_faults_per_mib_mean": round(
                    statistics.mean(r["client_faults_per_mib"] for r in rs), 1
                ),
            }
            for label, rs in (("before", before), ("after", after))
        }
        summary[measure]["after_over_before_median_of_pairs"] = round(  # type: ignore[index]
            statistics.median(pairs), 3
        )
    print(
        json.dumps(
            {
                "command": " ".join(sys.argv),
                "load_average_before": round(load_before, 2),
                "load_average_after": round(os.getloadavg()[0], 2),
                "runs": runs,
                "summary": summary,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
