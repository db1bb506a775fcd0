"""One thaw path, repeated, for paired A/B runs and profiles of where its time goes.

    .venv/bin/python tools/bench/thaw_paths.py TRANSPORT MIB ROUNDS [8b|tiny]
    SPY=1 [CLIENT=1] .venv/bin/python tools/bench/thaw_paths.py grpc 256 6

A `cwm serve` subprocess holds a window of random bf16 words (`data_plane.dataset`), and this
process thaws it ROUNDS times over TRANSPORT (auto, grpc, unix, tcp), printing MiB/s and the
client's CPU. With SPY=1, py-spy records the manager (CLIENT=1: this process) during the
timed rounds into /tmp/spy-TRANSPORT.txt (raw stacks).
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
chunks, ids = dataset(geo, mib, 1)
with WindowClient(m.target, timeout=600) as c:
    c.freeze("w", chunks, fingerprint=fingerprint(geo), token_ids=ids, transport="grpc")
    del chunks

    def thaw():
        with c.thaw("w", transport=transport, streams=1) as s:
            n = sum(len(ch.data) for ch in s)
        return n

    thaw()
    spied = os.getpid() if os.environ.get("CLIENT") else m.pid
    with py_spy(spied, f"/tmp/spy-{transport}.txt"):
        t = time.perf_counter()
        cpu0 = time.process_time()
        for _ in range(rounds):
            n = thaw()
        dt = time.perf_counter() - t
        cpu = time.process_time() - cpu0
        print(f"{transport}: {n * rounds / dt / 2**20:.0f} MiB/s, client cpu {cpu / dt:.2f} cores")
m.stop()
