"""A FreezeHeader's promises (windows.header): each chunk must start where the header put it,
and the window a header describes carries its chunks' sizes and codecs as the catalog
records them."""

from __future__ import annotations

import pytest

from cwm_client import pb
from cwm_client.chunks import chunk_raw_size
from cwm_client.errors import InvalidArgument
from cwm_client.windows.freeze_stream import build_header
from cwm_server.manager.catalog.base import NewChunk
from cwm_server.manager.windows.checks import expiry_from_ttl
from cwm_server.manager.windows.header import check_chunk_start, validate_header, window_info
from tests.helpers import FINGERPRINT, synthetic_chunks, token_ids

TOKENS = 600  # chunks of 256, 256 and 88 tokens
CHUNKS = synthetic_chunks(TOKENS)
HEADER = build_header("w", CHUNKS, fingerprint=FINGERPRINT, token_ids=token_ids(TOKENS))
SPANS = validate_header(HEADER, max_chunk_bytes=64 << 20)


def _part(position: int, **changes: object) -> pb.Chunk:
    """The first part of chunk `position` as a sender would send it, with `changes`."""
    chunk = CHUNKS[position]
    fields: dict[str, object] = {
        "index": position,
        "token_start": chunk.token_start,
        "token_count": chunk.token_count,
        "digest": chunk.digest,
        "codec": pb.ChunkCodec.CHUNK_CODEC_RAW,
        "raw_size": chunk.raw_size,
    }
    fields.update(changes)
    return pb.Chunk(**fields)  # type: ignore[arg-type]


def test_spans_cover_the_tokens_in_chunks_of_the_header() -> None:
    assert SPANS == [(0, 256), (256, 256), (512, 88)]


def test_a_chunk_where_the_header_put_it_is_accepted() -> None:
    check_chunk_start(_part(0), HEADER, SPANS, -1)
    check_chunk_start(_part(2), HEADER, SPANS, 0)  # chunks the store holds may be skipped


@pytest.mark.parametrize(
    ("part", "last_index", "field"),
    [
        (_part(2, index=3), -1, "chunk.index"),  # past the last chunk
        (_part(1), 1, "chunk.index"),  # sent twice
        (_part(0), 1, "chunk.index"),  # out of order
        (_part(1, token_start=255), 0, "chunk.token_start"),
        (_part(1, token_count=255), 0, "chunk.token_start"),
        (_part(1, raw_size=CHUNKS[1].raw_size - 2), 0, "chunk.raw_size"),
        (_part(1, digest=CHUNKS[0].digest), 0, "chunk.digest"),
        (_part(1, codec=0), 0, "chunk.codec"),
        (_part(1, codec=99), 0, "chunk.codec"),
    ],
)
def test_a_chunk_that_breaks_the_header_is_refused_naming_the_field(
    part: pb.Chunk, last_index: int, field: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        check_chunk_start(part, HEADER, SPANS, last_index)
    assert refused.value.field == field


def test_the_window_carries_each_chunks_stored_size_and_codec() -> None:
    stored = {
        chunk.digest: NewChunk(chunk.digest, chunk.raw_size, 100 + i, i % 2)
        for i, chunk in enumerate(CHUNKS)
    }
    expires = expiry_from_ttl(60)
    window = window_info("alice", HEADER, SPANS, stored, expires)
    assert window.tenant == "alice" and window.name == "w"
    assert [ref.digest for ref in window.chunks] == [c.digest for c in CHUNKS]
    assert [(ref.token_start, ref.token_count) for ref in window.chunks] == SPANS
    assert [ref.stored_size for ref in window.chunks] == [100, 101, 102]
    assert [ref.stored_codec for ref in window.chunks] == [0, 1, 0]
    assert window.raw_bytes == sum(chunk_raw_size(FINGERPRINT, n) for _, n in SPANS)
    assert window.stored_bytes == 303 and window.chunk_count == 3
    assert window.token_count == TOKENS and window.expires_at == expires
    assert not window_info("alice", HEADER, SPANS, stored, None).HasField("expires_at")
