"""A thawed chunk, and the one check every carrier's bytes pass before they become one: a
Thaw stream's parts (`windows.thaw_decoder`), a bulk connection (`bulk.thaw_reader`)."""

from __future__ import annotations

from dataclasses import dataclass

from cwm_client.chunks import digest
from cwm_client.codecs import RAW, decode
from cwm_client.errors import DataLoss


@dataclass(frozen=True)
class ThawedChunk:
    """One chunk of a thawed window: raw canonical bytes, verified against the digest."""

    index: int
    token_start: int
    token_count: int
    digest: bytes
    data: bytes | memoryview
    """`bytes`, or (on shared memory) a read-only memoryview of the sealed region the
    chunk came in, verified where it lies; the memory is freed when the last view of it
    goes. Either takes `len`, slicing, `bytes()`, `numpy.frombuffer` and file writes."""


def verified_chunk(
    window_name: str,
    index: int,
    token_start: int,
    token_count: int,
    chunk_digest: bytes,
    codec: int,
    data: bytes | bytearray | memoryview,
    raw_size: int,
    word: int,
) -> ThawedChunk:
    """A received chunk decoded and checked against its digest (DATA_LOSS if either fails):
    whatever carried it (a Thaw stream's parts, a bulk connection), nothing else reaches
    the caller. A raw chunk in a memoryview (a sealed shared-memory region) stays where it
    is: copying it out would cost more than the rest of its transfer."""
    raw: bytes | memoryview
    if codec == RAW and isinstance(data, memoryview) and data.readonly:
        if len(data) != raw_size:
            raise DataLoss(f"chunk {index}: {len(data)} bytes, expected {raw_size}")
        raw = data
    else:
        try:
            raw = decode(data, codec, raw_size, word)
        except ValueError as exc:
            raise DataLoss(f"chunk {index}: {exc}") from exc
    if digest(raw) != chunk_digest:
        raise DataLoss(
            f"chunk {index} of window {window_name!r} does not match its digest; refusing to use it"
        )
    return ThawedChunk(index, token_start, token_count, chunk_digest, raw)
