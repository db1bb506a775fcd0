"""One freeze path, repeated, for paired A/B runs and profiles of where its time goes.

    .venv/bin/python tools/bench/freeze_paths.py TRANSPORT MIB ROUNDS [8b|tiny] [--no-fsync]
    SPY=1 .venv/bin/python tools/bench/freeze_paths.py unix 256 4

A `cwm serve` subprocess (fsync on, as `cwm serve` defaults) receives ROUNDS windows of
fresh random bf16 words (`data_plane.dataset`, a new seed each: nothing deduplicates) over
TRANSPORT (auto, grpc, shm, unix, tcp); this prints MiB/s and the client's CPU. With SPY=1,
py-spy records the manager during the timed rounds into /tmp/spy-freeze-TRANSPORT.txt.
"""

import atexit
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from common import py_spy
from data_plane import Manager, dataset, fingerprint

from cwm_client import WindowClient, tune_allocator

tune_allocator()
transport = sys.argv[1]
mib = int(sys.argv[2])
rounds = int(sys.argv[3])
geo = sys.argv[4] if len(sys.argv) > 4 else "8b"
scratch = Path(tempfile.mkdtemp(prefix="cwm-bench-"))
atexit.register(shutil.rmtree, scratch, ignore_errors=True)  # GiBs of chunk files
m = Manager(scratch / "m", "127.0.0.1", in_namespace=False)
windows = [dataset(geo, mib, seed) for seed in range(rounds + 1)]
with WindowClient(m.target, timeout=600) as c:

    def freeze(i: int) -> int:
        chunks, ids = windows[i]
        c.freeze(f"w{i}", chunks, fingerprint=fingerprint(geo), token_ids=ids, transport=transport)
        return sum(ch.raw_size for ch in chunks)

    freeze(rounds)  # warm
    gil = ["--gil"] if os.environ.get("SPY") == "gil" else []
    with py_spy(m.pid, f"/tmp/spy-freeze-{transport}.txt", "--nonblocking", *gil):
        t = time.perf_counter()
        cpu0 = time.process_time()
        n = sum(freeze(i) for i in range(rounds))
        dt = time.perf_counter() - t
        cpu = time.process_time() - cpu0
        print(f"freeze {transport}: {n / dt / 2**20:.0f} MiB/s, client cpu {cpu / dt:.2f} cores")
m.stop()
