"""Freeze and thaw throughput of a large window over loopback, with the manager's peak RSS.

Runs `cwm serve` as a subprocess (defaults: fsync on, compression when it pays, 256 MiB
memory tier) and, in the same run, a plain loopback TCP transfer of the same bytes as the
ceiling, so the report is a ratio on one machine rather than a number from a good day.

    .venv/bin/python tools/bench/freeze_thaw.py [--gib 1.0] [--kind random|kv]

Appends a section to docs/BENCHMARKS.md and writes the raw numbers to
docs/bench/freeze_thaw-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cwm_client import WindowClient, chunks_from_bytes, pb  # noqa: E402

MiB = 1 << 20
FINGERPRINT = pb.ModelFingerprint(
    model_id="bench-1mib-chunks",
    kv_dtype=pb.KvDtype.KV_DTYPE_BFLOAT16,
    num_layers=4,
    num_kv_heads=4,
    head_dim=64,
    engine_name="synthetic",
    block_size=16,
)
CHUNK_TOKENS = 256  # 4 KiB per token -> 1 MiB per chunk


def make_chunks(total_bytes: int, kind: str) -> list[bytes]:
    rng = np.random.default_rng(1)
    count = total_bytes // MiB
    if kind == "random":
        return [rng.integers(0, 256, MiB, dtype=np.uint8).tobytes() for _ in range(count)]
    # bf16 words of N(0, 1) activations: what KV looks like to a compressor.
    out = []
    for _ in range(count):
        floats = rng.standard_normal(MiB // 2, dtype=np.float32)
        out.append((floats.view(np.uint32) >> 16).astype("<u2").tobytes())
    return out


def socket_ceiling(chunks: list[bytes]) -> float:
    """MiB/s of a plain loopback TCP send of the same bytes (receiver discards)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    received = [0]

    def sink() -> None:
        conn, _ = server.accept()
        buf = bytearray(MiB)
        while (n := conn.recv_into(buf)) > 0:
            received[0] += n
        conn.close()

    thread = threading.Thread(target=sink)
    thread.start()
    client = socket.create_connection(("127.0.0.1", port))
    started = time.perf_counter()
    for chunk in chunks:
        client.sendall(chunk)
    client.shutdown(socket.SHUT_WR)
    thread.join()
    elapsed = time.perf_counter() - started
    client.close()
    server.close()
    return received[0] / MiB / elapsed


class Manager:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port_file = data_dir.parent / "bench.port"
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
            cwd=ROOT,
        )
        while not self.port_file.exists():
            if self.proc.poll() is not None:
                raise SystemExit("manager failed to start")
            time.sleep(0.05)
        return f"127.0.0.1:{self.port_file.read_text()}"

    def peak_rss_mib(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(gib: float, kind: str) -> dict[str, object]:
    total = int(gib * 1024) * MiB
    pieces = make_chunks(total, kind)
    tokens = len(pieces) * CHUNK_TOKENS
    chunks = chunks_from_bytes(pieces, CHUNK_TOKENS, tokens)
    token_ids = [i % 32000 for i in range(tokens)]
    ceiling = socket_ceiling(pieces)
    scratch = Path(tempfile.mkdtemp(prefix="cwm-bench-"))
    manager = Manager(scratch / "data")
    results: dict[str, object] = {"bytes": total, "chunks": len(pieces), "kind": kind}
    try:
        target = manager.start()
        with WindowClient(target) as client:
            started = time.perf_counter()
            client.freeze("bench", chunks, fingerprint=FINGERPRINT, token_ids=token_ids)
            freeze_s = time.perf_counter() - started
        results["freeze_mib_s"] = total / MiB / freeze_s
        results["peak_rss_mib_after_freeze"] = manager.peak_rss_mib()
        results["stored_bytes_on_disk"] = dir_bytes(scratch / "data" / "chunks")
        manager.stop()
        target = manager.start()  # cold: every chunk comes from disk
        with WindowClient(target) as client:
            started = time.perf_counter()
            with client.thaw("bench") as stream:
                ok = all(c.digest == chunks[c.index].digest for c in stream)
            thaw_s = time.perf_counter() - started
            started = time.perf_counter()
            client.clone("bench", "bench-clone")
            results["clone_ms"] = (time.perf_counter() - started) * 1000
        results["thaw_cold_mib_s"] = total / MiB / thaw_s
        results["thaw_identical"] = ok
        results["peak_rss_mib_after_thaw"] = manager.peak_rss_mib()
    finally:
        manager.stop()
        subprocess.run(["rm", "-rf", str(scratch)], check=False)
    results["socket_ceiling_mib_s"] = ceiling
    results["freeze_vs_socket"] = results["freeze_mib_s"] / ceiling  # type: ignore[operator]
    results["thaw_vs_socket"] = results["thaw_cold_mib_s"] / ceiling  # type: ignore[operator]
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--kind", choices=["random", "kv"], default="random")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    results = run(args.gib, args.kind)
    machine = (
        f"{platform.node()} ({os.cpu_count()} cores, {platform.machine()}, "
        f"Python {platform.python_version()})"
    )
    stamp = datetime.now(UTC)
    record = {"date": stamp.isoformat(), "machine": machine, "command": " ".join(sys.argv)}
    record.update(results)
    print(json.dumps(record, indent=2))
    if args.no_record:
        return 0
    out_dir = ROOT / "docs" / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"freeze_thaw-{args.kind}-{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    r = results
    rows = [
        ("freeze (client → manager, fsync, stored)", f"{r['freeze_mib_s']:.0f} MiB/s"),
        (
            "thaw after restart (disk → client, verified both ends)",
            f"{r['thaw_cold_mib_s']:.0f} MiB/s",
        ),
        (
            "plain loopback TCP of the same bytes (ceiling)",
            f"{r['socket_ceiling_mib_s']:.0f} MiB/s",
        ),
        (
            "freeze / ceiling, thaw / ceiling",
            f"{r['freeze_vs_socket']:.2f}, {r['thaw_vs_socket']:.2f}",
        ),
        (
            "manager peak RSS after freeze / after thaw",
            f"{r['peak_rss_mib_after_freeze']:.0f} MiB / {r['peak_rss_mib_after_thaw']:.0f} MiB",
        ),
        (
            f"bytes on disk for {int(r['bytes']) // MiB} MiB raw",  # type: ignore[call-overload]
            f"{int(r['stored_bytes_on_disk']) / MiB:.0f} MiB",
        ),  # type: ignore[call-overload]
        ("clone of the window", f"{r['clone_ms']:.1f} ms"),
        ("thawed bytes identical", "yes" if r["thaw_identical"] else "NO"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    section = (
        f"\n### Freeze / thaw, {args.gib:g} GiB {args.kind} window, one stream "
        f"({stamp.date()})\n\n"
        f"Command: `.venv/bin/python tools/bench/freeze_thaw.py --gib {args.gib:g} "
        f"--kind {args.kind}`\n"
        f"Machine: {machine}. Raw numbers: `{json_path.relative_to(ROOT)}`.\n\n"
        f"| measure | value |\n|---|---|\n{table}\n"
    )
    with open(ROOT / "docs" / "BENCHMARKS.md", "a") as handle:
        handle.write(section)
    return 0 if results["thaw_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
