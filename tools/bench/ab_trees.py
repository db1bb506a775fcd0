"""Before/after: the same freeze and thaw with the code of two source trees, alternating.

    git archive <rev> | tar -x -C /tmp/cwm-before
    .venv/bin/python tools/bench/ab_trees.py /tmp/cwm-before . [--mib 512] [--rounds 3]

For each tree, a `cwm serve` and a client process run from that tree's code (same Python
environment); both datasets (reference-model-like bf16 KV in 256 KiB chunks, random bytes in
1 MiB chunks) are frozen, thawed from the memory tier, and thawed again after a restart with
the memory tier off (disk tier). Rounds alternate the trees so drift on a shared machine hits
both. Prints JSON: MiB/s per tree, measure and round, and the medians.
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

CLIENT = r"""
import json, os, sys, time, subprocess, tempfile, shutil
from pathlib import Path
import numpy as np
from cwm_client import WindowClient, chunks_from_bytes, pb
MiB = 1 << 20
mib, kind = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(11)
if kind == "kv":
    size = 256 << 10
    heads = 1
    pieces = [
        (rng.standard_normal(size // 2).astype(np.float32).view(np.uint32) >> 16)
        .astype("<u2").tobytes()
        for _ in range(mib * 4)
    ]
else:
    size = MiB
    heads = 4
    pieces = [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for _ in range(mib)]
fp = pb.ModelFingerprint(model_id="ab", kv_dtype=pb.KvDtype.KV_DTYPE_BFLOAT16, num_layers=4,
                         num_kv_heads=heads, head_dim=64, engine_name="ab", block_size=16)
chunks = chunks_from_bytes(pieces, 256, 256 * len(pieces))
ids = [i % 32000 for i in range(256 * len(pieces))]
scratch = Path(tempfile.mkdtemp())
def serve(cap):
    port = scratch / "port"
    port.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "cwm_server.cli.main", "serve", "--data-dir",
        str(scratch / "data"), "--listen", "127.0.0.1:0", "--port-file", str(port),
        "--log-level", "WARNING", "--memory-cache-mib", str(cap)])
    while not port.exists():
        time.sleep(0.05)
    return proc, "127.0.0.1:" + port.read_text()
def thaw(client):
    started = time.perf_counter()
    with client.thaw("w") as stream:
        for _ in stream:
            pass
    return mib / (time.perf_counter() - started)
out = {}
proc, target = serve(mib + 100)
with WindowClient(target) as client:
    started = time.perf_counter()
    client.freeze("w", chunks, fingerprint=fp, token_ids=ids)
    out["freeze"] = mib / (time.perf_counter() - started)
    out["thaw_memory"] = thaw(client)
proc.terminate(); proc.wait()
proc, target = serve(0)
with WindowClient(target) as client:
    out["thaw_disk"] = thaw(client)
proc.terminate(); proc.wait()
shutil.rmtree(scratch)
print(json.dumps(out))
"""


def run(tree: Path, mib: int, kind: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(CLIENT)
    try:
        out = subprocess.run(
            [sys.executable, handle.name, str(mib), kind],
            cwd=tree,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
    finally:
        os.unlink(handle.name)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--kv-mib", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        k: {"kv": [], "random": []} for k in trees
    }
    for _ in range(args.rounds):
        for label, tree in trees.items():
            runs[label]["kv"].append(run(tree, args.kv_mib, "kv"))
            runs[label]["random"].append(run(tree, args.mib, "random"))
            print(label, runs[label]["kv"][-1], runs[label]["random"][-1], file=sys.stderr)
    medians = {
        label: {
            kind: {key: round(statistics.median(r[key] for r in results), 1) for key in results[0]}
            for kind, results in by_kind.items()
        }
        for label, by_kind in runs.items()
    }
    print(json.dumps({"command": " ".join(sys.argv), "runs": runs, "medians": medians}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
