"""The archive's layout: member names, the format's name and version, and the summary
written as ``manifest.json``. Writer and reader both follow it from here."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from cwm_client import pb

FORMAT = "cwm-window-archive"
FORMAT_VERSION = 1
MANIFEST_PB = "manifest.pb"
MANIFEST_JSON = "manifest.json"
CHUNK_DIR = "chunks"
MAX_MANIFEST_BYTES = 256 << 20
"""Refuse a manifest larger than this: room for tens of millions of token ids (a token id
takes at most 5 bytes of protobuf)."""


def chunk_member_name(index: int, digest: bytes) -> str:
    """The tar member that holds chunk `index` with this digest."""
    return f"{CHUNK_DIR}/{index:06d}-{digest.hex()}.bin"


def short_digest(digest: bytes) -> str:
    """The first 16 hex digits of a digest, for messages."""
    return digest.hex()[:16] + "…"


def iso_time(stamp: Timestamp) -> str:
    return datetime.fromtimestamp(stamp.seconds + stamp.nanos / 1e9, UTC).isoformat()


def manifest_summary(window: pb.WindowInfo, manifest_digest: bytes) -> dict[str, Any]:
    """The content of ``manifest.json``: the format and a summary for people and scripts."""
    fp = window.fingerprint
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "manifest": MANIFEST_PB,
        "manifest_blake3": manifest_digest.hex(),
        "chunk_members": f"{CHUNK_DIR}/<index:06d>-<blake3 hex>.bin",
        "name": window.name,
        "tenant": window.tenant,
        "session_id": window.session_id,
        "tokens": window.token_count,
        "chunks": window.chunk_count,
        "chunk_tokens": window.chunk_tokens,
        "raw_bytes": window.raw_bytes,
        "parent": window.parent,
        "tags": dict(window.tags),
        "description": window.description,
        "created_at": iso_time(window.created_at) if window.HasField("created_at") else None,
        "expires_at": iso_time(window.expires_at) if window.HasField("expires_at") else None,
        "pinned": window.pinned,
        "model": {
            "model_id": fp.model_id,
            "weights_digest": fp.weights_digest,
            "tokenizer_digest": fp.tokenizer_digest,
            "kv_dtype": pb.KvDtype.Name(fp.kv_dtype),
            "num_layers": fp.num_layers,
            "num_kv_heads": fp.num_kv_heads,
            "head_dim": fp.head_dim,
            "block_size": fp.block_size,
            "engine": fp.engine_name,
            "engine_version": fp.engine_version,
        },
    }
