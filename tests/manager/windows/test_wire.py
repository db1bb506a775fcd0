"""Thaw's pre-encoded chunk parts (cwm_server.manager.windows.wire) are exactly the ThawResponses
`fill_parts` builds: same messages, same parts, same sizes, so clients see no difference."""

from __future__ import annotations

import os

import pytest

from cwm_client import codecs, pb
from cwm_client.chunks import fill_parts
from cwm_server.manager.windows.wire import MIN_PART_BYTES, part_size, thaw_parts


def _response() -> tuple[pb.ThawResponse, pb.Chunk]:
    response = pb.ThawResponse()
    return response, response.chunk


@pytest.mark.parametrize(
    ("total", "part_bytes"),
    [
        (1 << 20, 1 << 20),  # one part
        (1 << 20, 200 * 1024),  # several parts, a short last one
        (3 * 65536, 65536),  # several parts, all full
        (5, 1 << 20),
        (0, 1 << 20),  # no data: the field is left out, as protobuf does
    ],
)
@pytest.mark.parametrize("as_view", [False, True])
@pytest.mark.parametrize("codec", [codecs.RAW, codecs.BYTEPLANE_ZSTD])
def test_pre_encoded_parts_equal_built_messages(
    total: int, part_bytes: int, as_view: bool, codec: int
) -> None:
    data = os.urandom(total)
    encoded = memoryview(data) if as_view else data
    ref = pb.ChunkRef(
        index=7, token_start=1792, token_count=256, digest=os.urandom(32), raw_size=total + 3
    )
    built = list(fill_parts(_response, ref, encoded, codec, part_bytes))
    wire = list(thaw_parts(ref, encoded, codec, part_bytes))
    assert len(wire) == len(built)
    for message, pre in zip(built, wire, strict=True):
        assert pb.ThawResponse.FromString(pre.wire) == message
        assert len(pre.wire) == message.ByteSize()
        assert pre.chunk_bytes == len(message.chunk.data)
        assert pre.first_part == (message.chunk.data_offset == 0)


def test_part_size_takes_what_is_asked_within_its_bounds() -> None:
    mib = 1 << 20
    assert part_size(0, mib, ceiling=mib) == mib  # nothing asked: the default
    assert part_size(256 << 10, mib, ceiling=mib) == 256 << 10
    assert part_size(8 * mib, mib, ceiling=4 * mib) == 4 * mib  # capped
    assert part_size(2 * mib, mib, ceiling=4 * mib) == 2 * mib  # above the default is fine
    assert part_size(1, mib, ceiling=mib) == MIN_PART_BYTES  # never tiny
    assert part_size(0, 1024, ceiling=1024) == MIN_PART_BYTES
