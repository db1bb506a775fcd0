"""The docs/BENCHMARKS.md section for one suite result (every number from the JSON)."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

ROWS: list[tuple[str, str, str]] = [
    ("ceiling: loopback TCP, one connection", "tcp", "tcp"),
    ("ceiling: one file, write + fsync / read (page cache)", "file_write", "file_read"),
    ("redis-py SET / GET per chunk (LMCache `redis://`)", "redis_set", "redis_get"),
    ("slot file save / restore (llama.cpp, no fsync)", "slot_save", "slot_restore"),
    ("**cwm** freeze / thaw, 1 stream, memory tier", "freeze_1", "thaw_memory_1"),
    ("**cwm** freeze / thaw, N streams, memory tier", "freeze_n", "thaw_memory_n"),
    ("**cwm** thaw, 1 stream, disk tier (restarted, hot tier off)", "", "thaw_disk_1"),
    ("**cwm** thaw, N streams, disk tier", "", "thaw_disk_n"),
    ("**cwm** disk tier read + decode + BLAKE3, in-process, 1 thread", "", "disk_read_verified_1"),
    ("**cwm** same, 4 threads (as a thaw's read-ahead)", "", "disk_read_verified_4"),
]


def _cell(systems: dict[str, Any], key: str) -> str:
    if not key or key not in systems:
        return "-"
    return f"{systems[key]['mib_s']:.0f}"


def _dataset_section(key: str, data: dict[str, Any], streams: int) -> str:
    systems = data["systems"]
    lines = [
        f"#### {key}: {data['description']}",
        "",
        f"{data['raw_bytes'] / (1 << 20):.0f} MiB in {data['chunks']} chunks of "
        f"{data['chunk_bytes'] // 1024} KiB; N = {streams} streams. MiB/s of the median of "
        f"{len(systems['tcp']['seconds'])} rounds (each round runs every system once).",
        "",
        "| system | write / save / freeze | read / restore / thaw |",
        "|---|---:|---:|",
    ]
    for label, write, read in ROWS:
        lines.append(f"| {label} | {_cell(systems, write)} | {_cell(systems, read)} |")
    no_fsync = systems.get("freeze_1_no_fsync")
    if no_fsync:
        lines.append(f"| **cwm** freeze, 1 stream, `--no-fsync` | {no_fsync['mib_s']:.0f} | - |")
    lines.append("")
    stored = data["stored_ratio"]
    clone = data["clone_ms"]
    extra = [
        f"- bytes on disk: {data['stored_bytes'] / (1 << 20):.1f} MiB for "
        f"{data['raw_bytes'] / (1 << 20):.1f} MiB raw: **{stored:.3f} x raw** (lossless; "
        "thawed bytes identical from memory: "
        f"{'yes' if data['identical_memory'] else 'NO'}, from disk: "
        f"{'yes' if data['identical_disk'] else 'NO'})",
        "- clone: "
        + ", ".join(
            f"{c['mib']:.0f} MiB window {c['median_ms']:.1f} ms (median of {len(c['ms'])})"
            for c in clone.values()
        ),
    ]
    inc = data.get("incremental")
    if inc:
        extra.append(
            f"- incremental re-freeze: a session grown from {inc['tokens_before']} to "
            f"{inc['tokens_after']} tokens sent {inc['bytes_sent'] / 1024:.0f} KiB of "
            f"{inc['raw_bytes_after'] / 1024:.0f} KiB ({inc['fraction_sent']:.1%}; "
            f"{inc['chunks_sent']} chunks sent, {inc['chunks_reused']} reused) in "
            f"{inc['refreeze_ms']:.0f} ms"
        )
    if data.get("other_load"):
        extra.append(
            "- cores kept busy by other processes when each round started: "
            + ", ".join(f"{x:.1f}" for x in data["other_load"])
        )
    rss = data["rss"]
    extra.append(
        "- manager peak RSS (sampled every 20 ms) vs cap + 128 MiB: "
        + ", ".join(
            f"{name} {r['peak_rss_mib']:.0f}/{r['limit_mib']} MiB" for name, r in rss.items()
        )
    )
    wire = data.get("wire_codecs")
    if wire:
        extra.append(
            "- wire codecs (loopback; freeze sends with the codec, thaw accepts it): "
            + "; ".join(
                f"{name}: freeze {w['freeze']['mib_s']:.0f} MiB/s with "
                f"{w['freeze_wire_ratio']:.2f} of the bytes, thaw {w['thaw']['mib_s']:.0f} "
                f"MiB/s with {w['thaw_wire_ratio']:.2f}"
                for name, w in wire.items()
            )
        )
    return "\n".join(lines + extra) + "\n"


def _targets_section(rows: list[dict[str, Any]]) -> str:
    lines = ["| target | dataset | measure | value | goal | met |", "|---|---|---|---:|---:|---|"]
    for row in rows:
        measure = f"{row['ours']} / {row['baseline']}" if "ours" in row else ""
        lines.append(
            f"| {row['target']} | {row['dataset']} | {measure} | {row['value']} | "
            f"{row['goal']} | {'yes' if row['met'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def _profile_section(profile: dict[str, Any]) -> str:
    lines: list[str] = []
    for name, summary in profile.items():
        if "top_self" not in summary:
            continue
        share = summary["active_samples"] / max(
            1, summary["active_samples"] + summary["idle_samples"]
        )
        top = ", ".join(f"`{f}` {p:.0%}" for f, p in summary["top_self"][:8])
        lines.append(f"- {name} ({share:.0%} of samples busy): {top}")
    return "\n".join(lines) + "\n" if lines else ""


def markdown(record: dict[str, Any], json_path: PurePath) -> str:
    parts = [
        f"\n### Suite: cwm vs the ceiling and the peers ({record['date'][:10]})\n",
        f"Command: `{record['command']}` (`make bench`)  ",
        f"Machine: {record['machine']}; load average {record['load_average_before']} before, "
        f"{record['load_average_after']} after; {record['wall_s']:.0f} s in all.  ",
        f"Allocator: `cwm_client.tune_allocator()` "
        f"{'applied' if record.get('allocator_tuned') else 'not applied'} in the bench process "
        "(to every system measured in it).  ",
        f"Raw numbers: `{json_path}`. Plot: `docs/bench.png`.\n",
    ]
    for key, data in record["datasets"].items():
        parts.append(_dataset_section(key, data, record["streams"]))
    parts.append("#### Targets (ratios from this run)\n")
    parts.append(_targets_section(record["targets"]))
    if record.get("context"):
        parts.append("\n#### What bounds them (same-run ratios, not targets)\n")
        lines = ["| ratio | dataset | measure | value |", "|---|---|---|---:|"]
        for row in record["context"]:
            lines.append(
                f"| {row['label']} | {row['dataset']} | {row['ours']} / {row['baseline']} | "
                f"{row['value']} |"
            )
        parts.append("\n".join(lines) + "\n")
    for key, data in record["datasets"].items():
        if data.get("profile"):
            parts.append(f"\n#### Where the time goes ({key}, py-spy, leaf frames)\n")
            parts.append(_profile_section(data["profile"]))
    return "\n".join(parts)
