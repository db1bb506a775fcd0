"""The data plane against its ceilings, every ratio from one run on this machine.

    .venv/bin/python tools/bench/data_plane.py [--mib 256] [--repeat 3] [--no-netns]
        [--no-record]

Two datasets of random bf16 words (incompressible: the worst case), the same bytes for every
system: Llama-3-8B's KV geometry (32 layers x 8 KV heads x 128 dims, 128 KiB per token, 32
MiB chunks of 256 tokens) and the built-in tiny model's (4 x 2 x 32, 256 KiB chunks).

- ceilings: raw loopback TCP (the receiver reads into a reused buffer, verifies nothing);
  one file written and fsync'd (the durable ceiling); raw TCP over a veth pair into a
  network namespace this bench makes and removes (the "other host");
- cwm: a `cwm serve` subprocess (fsync on, memory tier big enough to hold the window),
  the blocking SDK verifying every chunk: freeze (fresh bytes each run) and thaw from the
  memory tier, over the default transport (the Unix socket here), `transport=tcp` and
  `transport=grpc`; then the same manager inside the namespace, reached over the veth,
  with `tcp` and `grpc`;
- redis-py with hiredis SET/GET of the same chunks on a private redis-server;
- the manager's peak RSS against its memory cap + 128 MiB.

Results go to docs/BENCHMARKS.md (a dated section) and docs/bench/data-plane-<stamp>.json.
The namespace needs root (`ip netns`); without it that part is skipped and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
from common import BENCH_DIR, DOCS, ROOT, MiB, Timing, load_average, machine, timed
from peers import RedisServer, file_write_read, redis_set_get, tcp_loopback

from cwm_client import InMemoryChunk, WindowClient, chunks_from_bytes, pb, tune_allocator

GEOMETRIES = {
    "8b": (32, 8, 128),
    "tiny": (4, 2, 32),
}
CHUNK_TOKENS = 256
NS = f"cwmbench{os.getpid()}"
HOST_ADDR, NS_ADDR = "169.254.77.1", "169.254.77.2"
MEMORY_CAP_MIB = 1024


TRANSPORTS = ("auto", "unix", "tcp", "grpc")
"""What the same-host runs compare: the SDK's default (shared memory for an 8B model's
chunks, the Unix socket for the tiny model's) and each transport forced."""


def fingerprint(name: str) -> pb.ModelFingerprint:
    layers, heads, dim = GEOMETRIES[name]
    return pb.ModelFingerprint(
        model_id=f"bench-{name}",
        kv_dtype=pb.KvDtype.KV_DTYPE_BFLOAT16,
        num_layers=layers,
        num_kv_heads=heads,
        head_dim=dim,
        engine_name="synthetic",
        block_size=16,
    )


def dataset(name: str, mib: int, seed: int) -> tuple[list[InMemoryChunk], list[int]]:
    layers, heads, dim = GEOMETRIES[name]
    chunk_bytes = 2 * layers * heads * dim * 2 * CHUNK_TOKENS
    count = max(1, mib * MiB // chunk_bytes)
    rng = np.random.default_rng(seed)
    pieces = [rng.integers(0, 256, chunk_bytes, dtype=np.uint8).tobytes() for _ in range(count)]
    tokens = count * CHUNK_TOKENS
    return chunks_from_bytes(pieces, CHUNK_TOKENS, tokens), [i % 32000 for i in range(tokens)]


# -- the other host ---------------------------------------------------------------------------


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@contextlib.contextmanager
def namespace() -> Iterator[bool]:
    """A network namespace behind a veth pair (link-local addresses inside it only); False
    where it cannot be made."""
    try:
        sh("ip", "netns", "add", NS)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"no network namespace ({exc}): the other-host part is skipped", file=sys.stderr)
        yield False
        return
    try:
        sh("ip", "link", "add", f"{NS}a", "type", "veth", "peer", "name", f"{NS}b")
        sh("ip", "link", "set", f"{NS}b", "netns", NS)
        sh("ip", "addr", "add", f"{HOST_ADDR}/30", "dev", f"{NS}a")
        sh("ip", "link", "set", f"{NS}a", "up")
        sh("ip", "netns", "exec", NS, "ip", "addr", "add", f"{NS_ADDR}/30", "dev", f"{NS}b")
        sh("ip", "netns", "exec", NS, "ip", "link", "set", f"{NS}b", "up")
        sh("ip", "netns", "exec", NS, "ip", "link", "set", "lo", "up")
        yield True
    finally:
        subprocess.run(["ip", "link", "del", f"{NS}a"], capture_output=True)
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


SINK = r"""
import socket, sys
server = socket.create_server((sys.argv[1], 0))
print(server.getsockname()[1], flush=True)
while True:
    conn, _ = server.accept()
    buf = memoryview(bytearray(4 << 20))
    while conn.recv_into(buf) > 0:
        pass
    conn.sendall(b"k")
    conn.close()
"""


def tcp_over_veth(pieces: Sequence[bytes], repeat: int) -> Timing:
    """Raw TCP from this host into the namespace (the receiver reads into a reused buffer)."""
    sink = subprocess.Popen(
        ["ip", "netns", "exec", NS, sys.executable, "-c", SINK, NS_ADDR],
        stdout=subprocess.PIPE,
    )
    try:
        assert sink.stdout is not None
        port = int(sink.stdout.readline())
        total = sum(len(p) for p in pieces)

        def once() -> None:
            conn = socket.create_connection((NS_ADDR, port))
            for piece in pieces:
                conn.sendall(piece)
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(1) == b"k"
            conn.close()

        return timed(once, total / MiB, repeat)
    finally:
        sink.kill()
        sink.wait()


# -- cwm ----------------------------------------------------------------------------------------


class Manager:
    """`cwm serve` (here, or inside the namespace), its peak RSS read from /proc."""

    def __init__(self, data_dir: Path, listen_host: str, in_namespace: bool) -> None:
        self.data_dir = data_dir
        port_file = data_dir.parent / f"{data_dir.name}.port"
        command = [
            sys.executable,
            "-m",
            "cwm_server.cli.main",
            "serve",
            "--data-dir",
            str(data_dir),
            "--listen",
            f"{listen_host}:0",
            "--port-file",
            str(port_file),
            "--memory-cache-mib",
            str(MEMORY_CAP_MIB),
            "--log-level",
            "WARNING",
        ]
        if in_namespace:
            command = ["ip", "netns", "exec", NS, *command]
        self.log = data_dir.parent / f"{data_dir.name}.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"manager failed to start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        self.target = f"{listen_host}:{port_file.read_text().strip()}"

    @property
    def pid(self) -> int:
        """The manager's own pid (under `ip netns exec`, its child)."""
        if self.proc.args[0] != "ip":
            return self.proc.pid
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return int(children.split()[0]) if children.strip() else self.proc.pid

    def peak_rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def cwm_runs(
    manager: Manager, name: str, mib: int, repeat: int, transports: Sequence[str], seed: int
) -> dict[str, Any]:
    """Freeze (fresh bytes each run) and thaw (from memory) over each transport."""
    results: dict[str, Any] = {}
    with WindowClient(manager.target, timeout=600) as client:
        for index, transport in enumerate(transports):
            results[transport] = one_transport(
                client, name, mib, repeat, transport, seed + 100 * index
            )
    return results


def one_transport(
    client: WindowClient, name: str, mib: int, repeat: int, transport: str, seed: int
) -> dict[str, Any]:
    fp = fingerprint(name)
    fresh = [dataset(name, mib, seed + i) for i in range(repeat)]
    total = sum(c.raw_size for c in fresh[0][0])
    runs = iter(range(repeat))
    taken: list[str] = []

    def freeze() -> None:
        i = next(runs)
        chunks, ids = fresh[i]
        result = client.freeze(
            f"{name}-{transport}-{i}",
            chunks,
            fingerprint=fp,
            token_ids=ids,
            transport=transport,
            streams=1,
        )
        taken.append(result.transport)
        if i:
            fresh[i] = ([], [])  # the first one is thawed below; the others can go

    freeze_t = timed(freeze, total / MiB, repeat)

    def thaw() -> None:
        with client.thaw(f"{name}-{transport}-0", transport=transport, streams=1) as stream:
            got = 0
            for chunk in stream:
                got += len(chunk.data)
            taken.append(stream.transport)
        assert got == total, (got, total)

    thaw()  # warm: the window in the memory tier
    thaw_t = timed(thaw, total / MiB, repeat)
    print(
        f"  {name} {transport:5s} freeze {freeze_t.mib_s:7.0f} MiB/s  "
        f"thaw {thaw_t.mib_s:7.0f} MiB/s  ({', '.join(sorted(set(taken)))})",
        file=sys.stderr,
    )
    return {"freeze": freeze_t.as_dict(), "thaw": thaw_t.as_dict(), "taken": sorted(set(taken))}


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-netns", action="store_true")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    tune_allocator()
    started = datetime.now(UTC)
    out: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "load_before": load_average(),
        "mib": args.mib,
        "repeat": args.repeat,
        "datasets": {},
    }
    with tempfile.TemporaryDirectory(prefix="cwm-dataplane-") as scratch_dir:
        scratch = Path(scratch_dir)
        with RedisServer() as redis_server:
            for index, name in enumerate(GEOMETRIES):
                chunks, _ = dataset(name, args.mib, seed=index)
                pieces = [c.raw for c in chunks]
                tcp = tcp_loopback(pieces, args.repeat)
                disk_write, _ = file_write_read(pieces, scratch, args.repeat)
                redis_set, redis_get = redis_set_get(pieces, redis_server.port, args.repeat)
                print(
                    f"{name}: tcp {tcp.mib_s:.0f}  disk write+fsync {disk_write.mib_s:.0f}  "
                    f"redis SET {redis_set.mib_s:.0f} GET {redis_get.mib_s:.0f} MiB/s",
                    file=sys.stderr,
                )
                manager = Manager(scratch / f"local-{name}", "127.0.0.1", in_namespace=False)
                try:
                    local = cwm_runs(manager, name, args.mib, args.repeat, list(TRANSPORTS), 10)
                    peak = manager.peak_rss()
                finally:
                    manager.stop()
                out["datasets"][name] = {
                    "chunk_bytes": chunks[0].raw_size,
                    "chunks": len(chunks),
                    "tcp_loopback": tcp.as_dict(),
                    "disk_write_fsync": disk_write.as_dict(),
                    "redis_set": redis_set.as_dict(),
                    "redis_get": redis_get.as_dict(),
                    "local": local,
                    "manager_peak_rss": peak,
                }
                del chunks, pieces
        if not args.no_netns:
            with namespace() as made:
                if made:
                    name = "8b"
                    chunks, _ = dataset(name, args.mib, seed=0)
                    veth = tcp_over_veth([c.raw for c in chunks], args.repeat)
                    del chunks
                    print(f"veth tcp {veth.mib_s:.0f} MiB/s", file=sys.stderr)
                    remote = Manager(scratch / "remote", NS_ADDR, in_namespace=True)
                    try:
                        runs = cwm_runs(remote, name, args.mib, args.repeat, ["tcp", "grpc"], 20)
                        peak = remote.peak_rss()
                    finally:
                        remote.stop()
                    out["other_host"] = {
                        "tcp_veth": veth.as_dict(),
                        "runs": runs,
                        "manager_peak_rss": peak,
                    }
    out["targets"] = targets(out)
    print(json.dumps(out["targets"], indent=2))
    if not args.no_record:
        record(out)


def targets(out: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(what: str, value: float, goal: float) -> None:
        rows.append({"target": what, "value": value, "goal": goal, "met": value >= goal})

    for name, data in out["datasets"].items():
        tcp = data["tcp_loopback"]["mib_s"]
        durable = min(tcp, data["disk_write_fsync"]["mib_s"])
        local = data["local"]
        if name == "8b":
            add(
                "thaw same host (auto) / loopback TCP",
                ratio(local["auto"]["thaw"]["mib_s"], tcp),
                1.2,
            )
            add(
                "freeze fsync (auto) / min(TCP, disk write+fsync)",
                ratio(local["auto"]["freeze"]["mib_s"], durable),
                0.8,
            )
            add("thaw gRPC / loopback TCP", ratio(local["grpc"]["thaw"]["mib_s"], tcp), 0.45)
        else:
            add(
                "tiny chunks: thaw (auto) / loopback TCP",
                ratio(local["auto"]["thaw"]["mib_s"], tcp),
                0.5,
            )
        add(
            f"{name}: thaw (auto) / redis GET",
            ratio(local["auto"]["thaw"]["mib_s"], data["redis_get"]["mib_s"]),
            1.0,
        )
        add(
            f"{name}: freeze (auto) / redis SET",
            ratio(local["auto"]["freeze"]["mib_s"], data["redis_set"]["mib_s"]),
            1.0,
        )
        cap = (MEMORY_CAP_MIB + 128) * MiB
        add(
            f"{name}: manager peak RSS <= cap + 128 MiB (cap+128 / peak)",
            ratio(cap, data["manager_peak_rss"]),
            1.0,
        )
    other = out.get("other_host")
    if other:
        veth = other["tcp_veth"]["mib_s"]
        add(
            "thaw other host (tcp) / veth TCP",
            ratio(other["runs"]["tcp"]["thaw"]["mib_s"], veth),
            0.65,
        )
        add(
            "thaw other host (grpc) / veth TCP",
            ratio(other["runs"]["grpc"]["thaw"]["mib_s"], veth),
            0.45,
        )
    return rows


def record(out: dict[str, Any]) -> None:
    stamp = out["date"].replace(":", "").replace("-", "")
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    (BENCH_DIR / f"data-plane-{stamp}.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [
        "",
        f"## Data plane, {out['date']} ({out['machine']})",
        "",
        f"`.venv/bin/python tools/bench/data_plane.py --mib {out['mib']} --repeat {out['repeat']}`"
        f" (load before: {out['load_before']}); raw numbers in "
        f"`docs/bench/data-plane-{stamp}.json`. Medians of {out['repeat']} runs, MiB/s.",
        "",
        "| dataset | loopback TCP | disk write+fsync | redis SET / GET | "
        "cwm freeze auto / unix / tcp / grpc | cwm thaw auto / unix / tcp / grpc | "
        "auto took | manager peak RSS |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, data in out["datasets"].items():
        local = data["local"]
        lines.append(
            f"| {name} ({data['chunk_bytes'] // 1024} KiB chunks) | "
            f"{data['tcp_loopback']['mib_s']:.0f} | {data['disk_write_fsync']['mib_s']:.0f} | "
            f"{data['redis_set']['mib_s']:.0f} / {data['redis_get']['mib_s']:.0f} | "
            + " / ".join(f"{local[t]['freeze']['mib_s']:.0f}" for t in TRANSPORTS)
            + " | "
            + " / ".join(f"{local[t]['thaw']['mib_s']:.0f}" for t in TRANSPORTS)
            + f" | {', '.join(local['auto']['taken'])}"
            + f" | {data['manager_peak_rss'] / MiB:.0f} MiB |"
        )
    other = out.get("other_host")
    if other:
        runs = other["runs"]
        lines += [
            "",
            f"Other host (manager in a network namespace behind a veth pair, 8b dataset): raw "
            f"TCP over the veth {other['tcp_veth']['mib_s']:.0f} MiB/s; cwm thaw tcp "
            f"{runs['tcp']['thaw']['mib_s']:.0f}, grpc {runs['grpc']['thaw']['mib_s']:.0f}; "
            f"freeze tcp {runs['tcp']['freeze']['mib_s']:.0f}, grpc "
            f"{runs['grpc']['freeze']['mib_s']:.0f} MiB/s.",
        ]
    lines += ["", "| target | value | goal | met |", "|---|---:|---:|---|"]
    for row in out["targets"]:
        met = "yes" if row["met"] else "no"
        lines.append(f"| {row['target']} | {row['value']} | {row['goal']} | {met} |")
    with open(DOCS / "BENCHMARKS.md", "a") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
