"""The Redis tier against plain redis-py, in one run, on one redis-server of its own.

    .venv/bin/python tools/bench/redis_tier.py [--chunks 64] [--chunk-kib 1024] [--rounds 5]

Both sides move the same chunk bytes to and from the same redis-server (started here on a
free loopback port, no persistence, stopped at the end):

- ``plain set/get``: redis-py ``SET``/``GET`` of each chunk, one round trip each;
- ``plain pipelined``: the same in one pipeline;
- ``tier put/get``: `RedisTier.write`/`read` (16-byte header + bytes in, header parsed out);
- ``tier put_many/get_many``: the tier's pipelined calls (`write_many`/`read_many`);
- ``store put/get``: what a manager with ``--redis-policy redis-only`` does per chunk:
  `ChunkStore.put` (BLAKE3 check, then the tier; compression off) and `ChunkStore.get`
  (the tier, then the BLAKE3 check of the bytes read; memory tier off).

Rounds alternate the measures so drift on a shared machine hits all of them; the medians and
the ratios tier/plain of the same run are what to read. Writes the raw JSON to
docs/bench/redis-tier-<timestamp>.json (``--no-save``: print only).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import redis  # noqa: E402

from cwm_client.chunks import digest as blake3_digest  # noqa: E402
from cwm_server.manager.tiers.disk import DiskTier  # noqa: E402
from cwm_server.manager.tiers.format import StoredChunk  # noqa: E402
from cwm_server.manager.tiers.memory import MemoryTier  # noqa: E402
from cwm_server.manager.tiers.redis import RedisTier  # noqa: E402
from cwm_server.manager.tiers.redis_link import RedisLink  # noqa: E402
from cwm_server.manager.tiers.store import ChunkStore  # noqa: E402
from tools.bench.common import BENCH_DIR, free_port, load_average, machine  # noqa: E402

MiB = 1 << 20
TENANT = "bench"


def start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [
            *(server, "--port", str(port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "no", "--dir", str(directory), "--protected-mode", "no"),
            *("--loglevel", "warning"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("redis-server did not start") from None
            time.sleep(0.05)
    client.close()
    return proc, port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--chunk-kib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()

    rng = np.random.default_rng(5)
    size = args.chunk_kib << 10
    chunks = [rng.integers(0, 256, size=size, dtype=np.uint8).tobytes() for _ in range(args.chunks)]
    digests = [blake3_digest(c) for c in chunks]
    total_mib = len(chunks) * size / MiB

    with tempfile.TemporaryDirectory(prefix="cwm-redis-bench-") as tmp:
        proc, port = start_redis(Path(tmp))
        try:
            plain = redis.Redis(port=port)
            link = RedisLink([f"redis://127.0.0.1:{port}"], timeout_s=10.0)
            tier = RedisTier(link)
            store = ChunkStore(
                DiskTier(Path(tmp) / "data", fsync=False),
                MemoryTier(0),
                compress=False,
                redis=tier,
                disk_enabled=False,
            )
            plain_keys = [f"plain:{d.hex()}" for d in digests]

            def plain_set() -> None:
                for key, data in zip(plain_keys, chunks, strict=True):
                    plain.set(key, data)

            def plain_get() -> None:
                for key in plain_keys:
                    assert plain.get(key) is not None

            def plain_pipe_set() -> None:
                pipe = plain.pipeline(transaction=False)
                for key, data in zip(plain_keys, chunks, strict=True):
                    pipe.set(key, data)
                pipe.execute()

            def plain_pipe_get() -> None:
                pipe = plain.pipeline(transaction=False)
                for key in plain_keys:
                    pipe.get(key)
                assert all(v is not None for v in pipe.execute())

            def tier_put() -> None:
                for digest, data in zip(digests, chunks, strict=True):
                    tier.write(TENANT, digest, StoredChunk(1, 2, len(data), data))

            def tier_get() -> None:
                for digest in digests:
                    assert tier.read(TENANT, digest) is not None

            def tier_put_many() -> None:
                items = [
                    (d, StoredChunk(1, 2, len(c), c)) for d, c in zip(digests, chunks, strict=True)
                ]
                tier.write_many(TENANT, items)

            def tier_get_many() -> None:
                assert all(s is not None for s in tier.read_many(TENANT, digests))

            def store_put() -> None:
                for index, (digest, data) in enumerate(zip(digests, chunks, strict=True)):
                    store.put(TENANT, digest, data, 2, f"chunk {index}")

            def store_get() -> None:
                for digest in digests:
                    store.get(TENANT, digest, "bench")

            measures: dict[str, Callable[[], None]] = {
                "plain set": plain_set,
                "plain get": plain_get,
                "plain pipelined set": plain_pipe_set,
                "plain pipelined get": plain_pipe_get,
                "tier put": tier_put,
                "tier get": tier_get,
                "tier put_many": tier_put_many,
                "tier get_many": tier_get_many,
                "store put (verify + tier)": store_put,
                "store get (tier + verify)": store_get,
            }
            seconds: dict[str, list[float]] = {name: [] for name in measures}
            for fn in measures.values():  # warm-up: connections, allocator
                fn()
            for _ in range(args.rounds):
                for name, fn in measures.items():
                    started = time.perf_counter()
                    fn()
                    seconds[name].append(time.perf_counter() - started)
            plain.close()
            link.close()
        finally:
            proc.terminate()
            proc.wait(timeout=20)

    results: dict[str, Any] = {}
    for name, runs in seconds.items():
        median = statistics.median(runs)
        results[name] = {
            "seconds": [round(s, 6) for s in runs],
            "median_s": round(median, 6),
            "mib_s": round(total_mib / median, 1),
        }

    def ratio(ours: str, theirs: str) -> float:
        return round(results[ours]["mib_s"] / results[theirs]["mib_s"], 3)

    report = {
        "benchmark": "redis_tier",
        "command": " ".join(["tools/bench/redis_tier.py", *sys.argv[1:]]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "load_average_1m_at_end": round(load_average(), 2),
        "redis_server": subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True
        ).stdout.strip(),
        "redis_py": redis.__version__,
        "chunks": args.chunks,
        "chunk_bytes": size,
        "mib_per_run": total_mib,
        "rounds": args.rounds,
        "results": results,
        "ratios": {
            "tier put / plain set": ratio("tier put", "plain set"),
            "tier get / plain get": ratio("tier get", "plain get"),
            "tier put_many / plain pipelined set": ratio("tier put_many", "plain pipelined set"),
            "tier get_many / plain pipelined get": ratio("tier get_many", "plain pipelined get"),
            "store put / plain set": ratio("store put (verify + tier)", "plain set"),
            "store get / plain get": ratio("store get (tier + verify)", "plain get"),
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if not args.no_save:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        path = BENCH_DIR / f"redis-tier-{stamp}.json"
        path.write_text(text + "\n")
        print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
