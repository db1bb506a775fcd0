"""The benchmark suite: cwm against the ceiling and the peers, same bytes, one run.

    .venv/bin/python tools/bench/suite.py [--random-mib 1024] [--kv-sessions 4]
        [--kv-tokens 7680] [--repeat 3] [--streams 4] [--profile] [--no-record]

Two datasets, each moved by every system: the KV of a few long sessions of the reference
engine (the built-in tiny Llama, bf16; `--kv-sessions` x `--kv-tokens` tokens) and random bf16
words (`--random-mib`, the worst case for compression). Systems:

- ceiling: loopback TCP; one file written (fsync) and read (page cache);
- peers: redis-py SET/GET per chunk on a private redis-server; a llama.cpp-style slot file;
- cwm: Freeze and Thaw through a `cwm serve` subprocess (fsync on, compression when it pays),
  over 1 stream and over `--streams`, from the memory tier and (after a restart with the hot
  tier off) from the disk tier; clone at 16 MiB and at the whole window; the incremental
  re-freeze of a grown session; the manager's peak RSS against its cap; bytes on disk; the
  disk tier's verified read in-process; wire codecs.

Every throughput is the median of `--repeat` runs. The results are appended to
docs/BENCHMARKS.md, the raw numbers written to docs/bench/suite-<stamp>.json and the plot to
docs/bench.png. `--profile` adds py-spy profiles of the manager and the client during one
freeze and one thaw (where the time goes, for the targets that are missed).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import blake3
from common import (
    BENCH_DIR,
    DOCS,
    ROOT,
    ManagerProcess,
    MiB,
    RssSampler,
    Timing,
    dir_bytes,
    load_average,
    machine,
    timed,
)
from datasets import Dataset, random_bf16, reference_kv
from peers import RedisServer, file_write_read, redis_set_get, slot_save_restore, tcp_loopback

from cwm_client import WindowClient, codecs, tune_allocator
from cwm_server.manager.config import default_data_dir
from cwm_server.manager.tiers.disk import DiskTier

TENANT = "default"
SLACK_MIB = 128
CLONE_SMALL_MIB = 16
CLONE_REPEAT = 5


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- cwm ----------------------------------------------------------------------------------


def _freeze(
    client: WindowClient, ds: Dataset, name: str, streams: int, **kw: Any
) -> tuple[float, Any]:
    started = time.perf_counter()
    result = client.freeze(
        name,
        kw.pop("chunks", ds.chunks),
        fingerprint=ds.fingerprint,
        token_ids=kw.pop("token_ids", ds.token_ids),
        streams=streams,
        **kw,
    )
    return time.perf_counter() - started, result


def _thaw(client: WindowClient, name: str, streams: int, **kw: Any) -> tuple[float, int]:
    started = time.perf_counter()
    with client.thaw(name, streams=streams, **kw) as stream:
        for _ in stream:
            pass
        encoded = stream.encoded_bytes
    return time.perf_counter() - started, encoded


def _identical(client: WindowClient, ds: Dataset, name: str, streams: int) -> bool:
    with client.thaw(name, streams=streams) as stream:
        return all(c.data == ds.chunks[c.index].raw for c in stream) and stream.streams == streams


def _rss_entry(manager: ManagerProcess, sampler: RssSampler, cap_mib: int) -> dict[str, Any]:
    peak = sampler.peak / MiB
    return {
        "peak_rss_mib": round(peak, 1),
        "cap_mib": cap_mib,
        "limit_mib": cap_mib + SLACK_MIB,
        "within": peak <= cap_mib + SLACK_MIB,
    }


def _measure_freeze(
    timing: Timing, client: WindowClient, ds: Dataset, name: str, streams: int
) -> None:
    seconds, result = _freeze(client, ds, name, streams, skip_existing=False, replace=True)
    timing.seconds.append(seconds)
    timing.extra.update(streams=result.streams, bytes_sent=result.bytes_sent)


def _measure_thaw(timing: Timing, client: WindowClient, name: str, streams: int) -> None:
    timing.seconds.append(_thaw(client, name, streams)[0])
    timing.extra["streams"] = streams


def cwm_round(
    ds: Dataset,
    scratch: Path,
    streams: int,
    timings: dict[str, Timing],
    rss: dict[str, dict[str, Any]],
    extras: dict[str, Any],
    round_: int,
    profile: bool,
) -> None:
    """One round of every cwm measure, on a fresh data dir; the one-off measures (bytes on
    disk, identical bytes, clone, incremental, wire codecs, profiles) in the first round."""
    first = round_ == 0
    data_dir = scratch / f"cwm-{ds.name}"
    shutil.rmtree(data_dir, ignore_errors=True)
    cap_mib = int(ds.mib * 1.25) + 64  # the whole window fits the hot tier
    window = "freeze_1"

    def sampled(key: str, manager: ManagerProcess, cap: int, work: Any) -> None:
        with RssSampler(manager.pid) as sampler:
            work()
        entry = _rss_entry(manager, sampler, cap)
        if key not in rss or entry["peak_rss_mib"] > rss[key]["peak_rss_mib"]:
            rss[key] = entry

    # The order of the 1-stream and N-stream measures flips every round: the first freeze
    # on a fresh data dir also creates its directories, the first thaw warms the caches.
    flip = (lambda pairs: pairs) if round_ % 2 == 0 else (lambda pairs: pairs[::-1])
    with (
        ManagerProcess(data_dir, ["--memory-cache-mib", str(cap_mib)]) as manager,
        WindowClient(manager.target, timeout=900) as client,
    ):
        for key, count in flip((("freeze_1", 1), ("freeze_n", streams))):
            sampled(
                key,
                manager,
                cap_mib,
                lambda key=key, count=count: _measure_freeze(timings[key], client, ds, key, count),
            )
        for key, count in flip((("thaw_memory_1", 1), ("thaw_memory_n", streams))):
            sampled(
                key,
                manager,
                cap_mib,
                lambda key=key, count=count: _measure_thaw(timings[key], client, window, count),
            )
        if first:
            extras["stored_bytes"] = dir_bytes(data_dir / "chunks")
            extras["stored_ratio"] = round(extras["stored_bytes"] / ds.raw_bytes, 4)
            extras["identical_memory"] = _identical(client, ds, window, 1) and _identical(
                client, ds, window, streams
            )
            extras["clone_ms"] = _clones(client, ds, window)
            if ds.session is not None and ds.grown is not None:
                extras["incremental"] = _incremental(client, ds)
            if ds.name == "kv":
                extras["wire_codecs"] = _wire_codecs(client, ds, window, 3)
            if profile:
                extras["profile"] = _profiles(client, ds, manager)
            extras["manager_vmhwm_mib_hot"] = round(manager.peak_rss() / MiB, 1)
    with (
        ManagerProcess(data_dir, ["--memory-cache-mib", "0"]) as manager,
        WindowClient(manager.target, timeout=900) as client,
    ):
        if first:
            extras["identical_disk"] = _identical(client, ds, window, streams)
        for key, count in flip((("thaw_disk_1", 1), ("thaw_disk_n", streams))):
            sampled(
                key,
                manager,
                0,
                lambda key=key, count=count: _measure_thaw(timings[key], client, window, count),
            )
        if first:
            extras["manager_vmhwm_mib_cold"] = round(manager.peak_rss() / MiB, 1)
    for threads in (1, 4):
        timings[f"disk_read_verified_{threads}"].seconds.extend(
            _disk_reads(ds, data_dir, threads, 1).seconds
        )
    shutil.rmtree(data_dir, ignore_errors=True)
    os.sync()
    data_dir = scratch / f"cwm-{ds.name}-nofsync"
    with (
        ManagerProcess(data_dir, ["--no-fsync"]) as manager,
        WindowClient(manager.target, timeout=900) as client,
    ):
        _measure_freeze(timings["freeze_1_no_fsync"], client, ds, "nofsync", 1)
    shutil.rmtree(data_dir, ignore_errors=True)


def _clones(client: WindowClient, ds: Dataset, window: str) -> dict[str, Any]:
    per_chunk = ds.chunks[0].raw_size
    small = max(1, min(len(ds.chunks), (CLONE_SMALL_MIB * MiB) // per_chunk))
    tokens = sum(c.token_count for c in ds.chunks[:small])
    _freeze(
        client, ds, "clone-src-small", 1, chunks=ds.chunks[:small], token_ids=ds.token_ids[:tokens]
    )
    out: dict[str, Any] = {}
    for label, source, mib in (
        ("small", "clone-src-small", small * per_chunk / MiB),
        ("window", window, ds.mib),
    ):
        times = []
        for run in range(CLONE_REPEAT):
            started = time.perf_counter()
            client.clone(source, f"clone-{label}-{run}")
            times.append((time.perf_counter() - started) * 1000)
        out[label] = {"mib": round(mib, 1), "ms": [round(t, 2) for t in times]}
        out[label]["median_ms"] = round(sorted(times)[len(times) // 2], 2)
    return out


def _incremental(client: WindowClient, ds: Dataset) -> dict[str, Any]:
    assert ds.session is not None and ds.grown is not None
    base_chunks, base_ids = ds.session
    grown_chunks, grown_ids = ds.grown
    _, first = _freeze(client, ds, "session", 1, chunks=base_chunks, token_ids=base_ids)
    seconds, again = _freeze(
        client, ds, "session-grown", 1, chunks=grown_chunks, token_ids=grown_ids, parent="session"
    )
    raw = sum(c.raw_size for c in grown_chunks)
    return {
        "tokens_before": len(base_ids),
        "tokens_after": len(grown_ids),
        "raw_bytes_after": raw,
        "bytes_sent": again.bytes_sent,
        "chunks_sent": again.chunks_sent,
        "chunks_reused": again.chunks_reused,
        "fraction_sent": round(again.bytes_sent / raw, 4),
        "first_freeze_bytes_sent": first.bytes_sent,
        "refreeze_ms": round(seconds * 1000, 1),
    }


def _wire_codecs(client: WindowClient, ds: Dataset, window: str, repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for codec in (codecs.RAW, codecs.LZ4, codecs.BYTEPLANE_LZ4, codecs.BYTEPLANE_ZSTD):
        name = codecs.codec_name(codec)
        freeze_t, thaw_t = Timing(ds.mib), Timing(ds.mib)
        sent = received = 0
        for run in range(repeat):
            seconds, result = _freeze(
                client, ds, f"wire-{name}-{run}", 1, skip_existing=False, wire_codec=codec
            )
            freeze_t.seconds.append(seconds)
            sent = result.bytes_sent
            seconds, received = _thaw(
                client, window, 1, accept_codecs=[] if codec == codecs.RAW else [codec]
            )
            thaw_t.seconds.append(seconds)
        out[name] = {
            "freeze": freeze_t.as_dict(),
            "thaw": thaw_t.as_dict(),
            "freeze_wire_ratio": round(sent / ds.raw_bytes, 4),
            "thaw_wire_ratio": round(received / ds.raw_bytes, 4),
        }
        log(
            f"{ds.name}: wire {name}: freeze {freeze_t.mib_s:.0f} MiB/s ({sent / ds.raw_bytes:.2f}"
            f" of raw on the wire), thaw {thaw_t.mib_s:.0f} MiB/s ({received / ds.raw_bytes:.2f})"
        )
    return out


def _disk_reads(ds: Dataset, data_dir: Path, threads: int, repeat: int) -> Timing:
    """What a thaw's read-ahead does per chunk, in-process: read the file, decode, check the
    BLAKE3 digest; on one thread or on `threads` threads."""
    disk = DiskTier(data_dir, fsync=False)

    def one(digest: bytes) -> int:
        stored = disk.read(TENANT, digest)
        if stored is None:
            raise SystemExit(f"chunk {digest.hex()} is missing")
        raw = codecs.decode(stored.data, stored.codec, stored.raw_size, stored.word_size)
        if blake3.blake3(raw).digest() != digest:
            raise SystemExit(f"chunk {digest.hex()} failed verification")
        return len(raw)

    digests = [c.digest for c in ds.chunks]
    if threads == 1:
        return timed(lambda: [one(d) for d in digests], ds.mib, repeat)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return timed(lambda: list(pool.map(one, digests)), ds.mib, repeat)


# -- profiles ------------------------------------------------------------------------------

_IDLE = (
    "_worker (concurrent/futures/thread.py:81)",
    "select (selectors.py",
    "wait (threading.py",
    "channel_spin",
    "_wait_once",
    "get (queue.py",
    "acquire",
)


def _py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


def _profile(pid: int, out: Path, work: Any) -> dict[str, Any]:
    spy = _py_spy()
    if spy is None:
        return {"error": "py-spy is not installed"}
    proc = subprocess.Popen(
        [spy, "record", "-r", "100", "-f", "raw", "-o", str(out), "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    try:
        work()
    finally:
        proc.send_signal(2)
        proc.wait(timeout=60)
    return _summarize(out)


def _summarize(path: Path, top: int = 12) -> dict[str, Any]:
    leaves: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    idle = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        frames = stack.split(";")
        if any(marker in frames[-1] for marker in _IDLE):
            idle += samples
            continue
        leaves[frames[-1]] += samples
        for name in {f.split(" (")[0] for f in frames}:
            functions[name] += samples
    active = sum(leaves.values()) or 1
    return {
        "active_samples": active,
        "idle_samples": idle,
        "top_self": [[f, round(n / active, 3)] for f, n in leaves.most_common(top)],
        "top_inclusive": [[f, round(n / active, 3)] for f, n in functions.most_common(top * 2)],
    }


def _profiles(client: WindowClient, ds: Dataset, manager: ManagerProcess) -> dict[str, Any]:
    out: dict[str, Any] = {}
    scratch = Path(tempfile.mkdtemp(prefix="cwm-bench-prof-"))
    for what, work in (
        (
            "freeze",
            lambda: _freeze(client, ds, "profiled", 1, skip_existing=False, replace=True),
        ),
        ("thaw", lambda: _thaw(client, "freeze_1", 1)),
    ):
        log(f"{ds.name}: profiling a {what} (manager and client)")
        out[f"manager_{what}"] = _profile(manager.pid, scratch / f"m-{what}.txt", work)
        out[f"client_{what}"] = _profile(os.getpid(), scratch / f"c-{what}.txt", work)
    shutil.rmtree(scratch, ignore_errors=True)
    return out


# -- the run -------------------------------------------------------------------------------


PEERS = ("tcp", "file_write", "file_read", "slot_save", "slot_restore", "redis_set", "redis_get")
OURS = (
    "freeze_1",
    "freeze_n",
    "thaw_memory_1",
    "thaw_memory_n",
    "thaw_disk_1",
    "thaw_disk_n",
    "disk_read_verified_1",
    "disk_read_verified_4",
    "freeze_1_no_fsync",
)


def run_dataset(
    ds: Dataset,
    scratch: Path,
    redis_port: int,
    repeat: int,
    streams: int,
    profile: bool,
    quiet: float,
) -> dict[str, Any]:
    """`repeat` rounds, each running every system once, so a burst of load from elsewhere
    on a shared machine lands on one round of every system rather than on all rounds of
    one."""
    pieces = ds.pieces
    log(f"{ds.name}: {ds.description} ({ds.mib:.0f} MiB)")
    timings = {key: Timing(ds.mib) for key in (*PEERS, *OURS)}
    rss: dict[str, dict[str, Any]] = {}
    extras: dict[str, Any] = {"other_load": []}
    for round_ in range(repeat):
        extras["other_load"].append(wait_for_quiet(quiet))
        timings["tcp"].seconds += tcp_loopback(pieces, 1).seconds
        write_t, read_t = file_write_read(pieces, scratch, 1)
        timings["file_write"].seconds += write_t.seconds
        timings["file_read"].seconds += read_t.seconds
        save_t, restore_t = slot_save_restore(pieces, ds.token_ids, scratch, 1)
        timings["slot_save"].seconds += save_t.seconds
        timings["slot_restore"].seconds += restore_t.seconds
        set_t, get_t = redis_set_get(pieces, redis_port, 1)
        timings["redis_set"].seconds += set_t.seconds
        timings["redis_get"].seconds += get_t.seconds
        # The slot file is written without fsync: its writeback must not land on cwm's
        # fsyncs in the next measure.
        os.sync()
        cwm_round(ds, scratch, streams, timings, rss, extras, round_, profile)
        log(
            f"{ds.name} round {round_ + 1}/{repeat}: "
            + ", ".join(f"{k} {t.mib / t.seconds[-1]:.0f}" for k, t in timings.items())
            + " MiB/s"
        )
    extras["rss"] = rss
    return {
        "description": ds.description,
        "raw_bytes": ds.raw_bytes,
        "chunks": len(ds.chunks),
        "chunk_bytes": ds.chunks[0].raw_size,
        "build_s": round(ds.build_s, 1),
        "systems": {key: timing.as_dict() for key, timing in timings.items()},
        **extras,
    }


def busy_cores(seconds: float = 1.0) -> float:
    """CPU cores busy over `seconds` while this process sleeps: load from elsewhere."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    cores = os.cpu_count() or 1
    return cores * (1 - (idle1 - idle0) / max(1, total1 - total0))


def wait_for_quiet(threshold: float, max_wait_s: float = 30.0) -> float:
    """Wait (up to `max_wait_s`) until other processes keep fewer than `threshold` cores
    busy; returns what they kept busy when the round started."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy = busy_cores()
        if busy < threshold or time.monotonic() > deadline:
            if busy >= threshold:
                log(f"other processes keep {busy:.1f} cores busy; measuring anyway")
            return round(busy, 2)


def targets(datasets: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue 7 with its ratio from this run."""
    rows: list[dict[str, Any]] = []

    def ratio(name: str, data: dict[str, Any], ours: str, theirs: str, goal: float) -> None:
        mine, other = data["systems"][ours]["mib_s"], data["systems"][theirs]["mib_s"]
        value = mine / other if other else 0.0
        rows.append(
            {
                "target": name,
                "dataset": data["key"],
                "ours": ours,
                "baseline": theirs,
                "value": round(value, 3),
                "goal": goal,
                "met": value >= goal,
            }
        )

    for key, data in datasets.items():
        data = {**data, "key": key}
        for thaw in ("thaw_memory_1", "thaw_memory_n", "thaw_disk_1", "thaw_disk_n"):
            ratio("thaw >= 1.0x redis-py GET", data, thaw, "redis_get", 1.0)
            ratio("thaw >= 0.5x loopback TCP", data, thaw, "tcp", 0.5)
        for freeze in ("freeze_1", "freeze_n"):
            ratio("freeze >= 1.0x redis-py SET", data, freeze, "redis_set", 1.0)
        for read in ("disk_read_verified_1", "disk_read_verified_4"):
            ratio("disk-tier read (verified) >= 0.8x plain file read", data, read, "file_read", 0.8)
        goal_ratio = 0.8 if key == "kv" else 1.0
        rows.append(
            {
                "target": "disk footprint <= 0.8x raw (reference KV); reported for random",
                "dataset": key,
                "value": data["stored_ratio"],
                "goal": goal_ratio,
                "met": data["stored_ratio"] <= goal_ratio if key == "kv" else True,
            }
        )
        for clone in data["clone_ms"].values():
            rows.append(
                {
                    "target": f"clone < 50 ms ({clone['mib']:.0f} MiB window)",
                    "dataset": key,
                    "value": clone["median_ms"],
                    "goal": 50,
                    "met": clone["median_ms"] < 50,
                }
            )
        worst = max(data["rss"].values(), key=lambda r: r["peak_rss_mib"] - r["cap_mib"])
        rows.append(
            {
                "target": "manager RSS <= memory cap + 128 MiB during every transfer",
                "dataset": key,
                "value": round(worst["peak_rss_mib"] - worst["cap_mib"], 1),
                "goal": SLACK_MIB,
                "met": all(r["within"] for r in data["rss"].values()),
            }
        )
    return rows


CONTEXT = (
    ("freeze_1", "file_write", "freeze vs this disk's own write + fsync of the same bytes"),
    ("freeze_1", "freeze_1_no_fsync", "freeze vs the same freeze without fsync"),
    ("thaw_memory_1", "thaw_disk_1", "thaw from memory vs from disk"),
)
"""Same-run ratios that are not targets but say what bounds one (the freeze target's peer,
redis-py SET, keeps nothing durable; the disk's own write + fsync does)."""


def context_ratios(datasets: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, data in datasets.items():
        systems = data["systems"]
        for ours, theirs, label in CONTEXT:
            other = systems[theirs]["mib_s"]
            value = systems[ours]["mib_s"] / other if other else 0.0
            rows.append(
                {
                    "label": label,
                    "dataset": key,
                    "ours": ours,
                    "baseline": theirs,
                    "value": round(value, 3),
                }
            )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--random-mib", type=int, default=1024)
    parser.add_argument("--kv-sessions", type=int, default=4)
    parser.add_argument("--kv-tokens", type=int, default=7680)
    parser.add_argument("--kv-grow", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--streams", type=int, default=4, help="streams of the N-stream runs")
    parser.add_argument("--profile", action="store_true", help="py-spy the manager and client")
    parser.add_argument(
        "--quiet",
        type=float,
        default=0.5,
        help="before each round, wait (up to 30 s) until other processes use fewer cores",
    )
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    # As every cwm command does; it applies to every system measured in this process, the
    # peers' clients (redis-py, the plain socket and file loops) included.
    tuned = tune_allocator()
    started = time.perf_counter()
    stamp = datetime.now(UTC)
    load_before = load_average()
    log("building the datasets")
    kv = reference_kv(
        args.kv_sessions, args.kv_tokens, args.kv_grow, default_data_dir() / "models" / "tiny-llama"
    )
    random = random_bf16(args.random_mib)
    scratch = Path(tempfile.mkdtemp(prefix="cwm-bench-"))
    results: dict[str, Any] = {}
    try:
        with RedisServer() as redis_server:
            for ds in (kv, random):
                results[ds.name] = run_dataset(
                    ds,
                    scratch,
                    redis_server.port,
                    args.repeat,
                    args.streams,
                    args.profile and ds.name == "random",
                    args.quiet,
                )
                ds.chunks = []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    import redis

    record: dict[str, Any] = {
        "date": stamp.isoformat(),
        "machine": machine(),
        "machine_short": f"{os.cpu_count()} cores",
        "command": "python tools/bench/suite.py " + " ".join(sys.argv[1:]),
        "versions": {"redis-py": redis.__version__, "python": sys.version.split()[0]},
        "allocator_tuned": tuned,
        "load_average_before": round(load_before, 2),
        "load_average_after": round(load_average(), 2),
        "wall_s": round(time.perf_counter() - started, 1),
        "repeat": args.repeat,
        "streams": args.streams,
        "datasets": results,
    }
    record["targets"] = targets(results)
    record["context"] = context_ratios(results)
    text = json.dumps(record, indent=2)
    print(text)
    if args.no_record:
        return 0
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    json_path = BENCH_DIR / f"suite-{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    json_path.write_text(text + "\n")
    from plot import plot
    from report import markdown

    plot(record, DOCS / "bench.png")
    with open(DOCS / "BENCHMARKS.md", "a") as handle:
        handle.write(markdown(record, json_path.relative_to(ROOT)))
    log(f"wrote {json_path.relative_to(ROOT)}, docs/bench.png, docs/BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
