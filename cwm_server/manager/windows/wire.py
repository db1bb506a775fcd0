"""Thaw chunk parts encoded straight into the protobuf wire format.

A ThawResponse carrying a chunk part is serialized here rather than built as a message and
serialized by gRPC: building it copies the part's bytes into the message, serializing copies
them again, and sizing it for the metrics (`ByteSize()`, reading `chunk.data`) cost as much
once more. Here the small fields are serialized as a Chunk without its data and the data is
appended after its length prefix: one copy of the bytes, and the sizes are known.

The bytes are exactly a serialized ThawResponse (the same fields, the data last, which every
protobuf parser accepts in any order), so clients see no difference. The manager's
serialization interceptor (`rpc.interceptors.serialization`) hands a `PreEncoded` to gRPC as it is.
"""

from __future__ import annotations

from collections.abc import Iterator

from cwm_client import pb

MIN_PART_BYTES = 64 << 10
"""Streams send chunk parts of at least this many bytes, whatever a request asks: a tiny
max_part_bytes must not turn one chunk into millions of messages."""


def part_size(asked: int, default: int, ceiling: int) -> int:
    """The part size a stream sends: what the request `asked` (0: `default`), at most
    `ceiling`, at least MIN_PART_BYTES. Thaw and GetKeyedChunks both size parts here."""
    return max(MIN_PART_BYTES, min(asked or default, ceiling))


class PreEncoded:
    """One response message already in wire format, with what the metrics count."""

    __slots__ = ("chunk_bytes", "first_part", "wire")

    def __init__(self, wire: bytes, chunk_bytes: int, first_part: bool) -> None:
        self.wire = wire
        self.chunk_bytes = chunk_bytes
        """Bytes of Chunk.data in this message."""
        self.first_part = first_part
        """True for a chunk's first part (data_offset 0): the metrics count chunks there."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited_key(number: int) -> bytes:
    return _varint((number << 3) | 2)


_CHUNK_KEY = _length_delimited_key(pb.ThawResponse.DESCRIPTOR.fields_by_name["chunk"].number)
_DATA_KEY = _length_delimited_key(pb.Chunk.DESCRIPTOR.fields_by_name["data"].number)


def thaw_parts(
    meta: pb.ChunkRef,
    encoded: bytes | memoryview,
    codec: int,
    part_bytes: int,
) -> Iterator[PreEncoded]:
    """The ThawResponses that carry one chunk, `part_bytes` of data each at most, as
    `chunks.fill_parts` would build them (same fields, same parts), already serialized."""
    total = len(encoded)
    head = pb.Chunk(
        index=meta.index,
        token_start=meta.token_start,
        token_count=meta.token_count,
        digest=meta.digest,
        codec=codec,  # type: ignore[arg-type]
        raw_size=meta.raw_size,
        encoded_size=total,
    )
    whole = isinstance(encoded, bytes) and total <= part_bytes
    view = None if whole else memoryview(encoded)
    offset = 0
    while True:
        size = min(part_bytes, total - offset)
        head.data_offset = offset
        fields = head.SerializeToString()
        piece = encoded if view is None else view[offset : offset + size]
        if size:
            length = _varint(size)
            body = len(fields) + len(_DATA_KEY) + len(length) + size
            wire = b"".join((_CHUNK_KEY, _varint(body), fields, _DATA_KEY, length, piece))
        else:  # proto3 leaves an empty bytes field out
            wire = b"".join((_CHUNK_KEY, _varint(len(fields)), fields))
        yield PreEncoded(wire, size, offset == 0)
        offset += size
        if offset >= total:
            return
