"""How windows look on a terminal and in `--json` output (one schema for both)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from cwm_client import pb


def iso_time(stamp: Timestamp) -> str:
    """A protobuf timestamp as ISO 8601 in UTC (the `--json` form)."""
    return datetime.fromtimestamp(stamp.seconds + stamp.nanos / 1e9, UTC).isoformat()


def table_time(stamp: Timestamp) -> str:
    """A protobuf timestamp for a table column: ``YYYY-MM-DD HH:MM:SS`` (UTC)."""
    return iso_time(stamp)[:19].replace("T", " ")


def window_dict(window: pb.WindowInfo, full: bool = False) -> dict[str, Any]:
    """The `--json` form of a window; keys are stable, scripts depend on them."""
    fp = window.fingerprint
    out: dict[str, Any] = {
        "name": window.name,
        "session_id": window.session_id,
        "tokens": window.token_count,
        "chunks": window.chunk_count,
        "chunk_tokens": window.chunk_tokens,
        "raw_bytes": window.raw_bytes,
        "stored_bytes": window.stored_bytes,
        "parent": window.parent,
        "tags": dict(window.tags),
        "description": window.description,
        "created_at": iso_time(window.created_at),
        "expires_at": iso_time(window.expires_at) if window.HasField("expires_at") else None,
        "pinned": window.pinned,
        "model": {
            "model_id": fp.model_id,
            "kv_dtype": pb.KvDtype.Name(fp.kv_dtype),
            "num_layers": fp.num_layers,
            "num_kv_heads": fp.num_kv_heads,
            "head_dim": fp.head_dim,
            "engine": fp.engine_name,
        },
    }
    if full:
        out["chunk_digests"] = [ref.digest.hex() for ref in window.chunks]
        out["token_ids"] = list(window.token_ids)
    return out


def count_of(count: int, noun: str) -> str:
    """ "1 chunk", "3 chunks": a count with its noun, singular for one."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def print_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    materialised = [list(map(str, r)) for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in materialised)]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line.rstrip())
    for row in materialised:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def window_row(window: pb.WindowInfo) -> list[str]:
    return [
        window.name,
        str(window.token_count),
        str(window.chunk_count),
        human_bytes(window.raw_bytes),
        human_bytes(window.stored_bytes),
        window.parent or "-",
        table_time(window.created_at),
        table_time(window.expires_at) if window.HasField("expires_at") else "never",
    ]


WINDOW_HEADERS = [
    "NAME",
    "TOKENS",
    "CHUNKS",
    "RAW",
    "STORED",
    "PARENT",
    "CREATED (UTC)",
    "EXPIRES (UTC)",
]
