"""Consistency of one window's own metadata (token and chunk counts, chunk order and spans,
sizes), which fsck checks without reading any chunk."""

from __future__ import annotations

from cwm_client import pb
from cwm_client.chunks import DTYPE_SIZE, chunk_raw_size, token_spans


def window_problems(window: pb.WindowInfo) -> list[str]:
    """Inconsistencies inside one window's own metadata."""
    found: list[str] = []
    if len(window.token_ids) != window.token_count:
        found.append(f"{len(window.token_ids)} token ids but token_count {window.token_count}")
    if len(window.chunks) != window.chunk_count:
        found.append(f"{len(window.chunks)} chunk refs but chunk_count {window.chunk_count}")
    if window.chunk_tokens == 0:
        found.append("chunk_tokens is 0")
        return found
    spans = token_spans(len(window.token_ids), window.chunk_tokens)
    if len(spans) != len(window.chunks):
        found.append(
            f"{len(window.token_ids)} tokens in chunks of {window.chunk_tokens} make "
            f"{len(spans)} chunks, the window lists {len(window.chunks)}"
        )
        return found
    sized = window.fingerprint.kv_dtype in DTYPE_SIZE
    for position, (ref, (start, count)) in enumerate(zip(window.chunks, spans, strict=True)):
        if ref.index != position or ref.token_start != start or ref.token_count != count:
            found.append(
                f"chunk ref {position} says chunk {ref.index} at tokens "
                f"[{ref.token_start}, +{ref.token_count}), expected [{start}, +{count})"
            )
        elif sized and ref.raw_size != chunk_raw_size(window.fingerprint, count):
            found.append(f"chunk {position} raw_size {ref.raw_size} does not fit the fingerprint")
    if window.raw_bytes != sum(ref.raw_size for ref in window.chunks):
        found.append(f"raw_bytes {window.raw_bytes} is not the sum of its chunks")
    return found
