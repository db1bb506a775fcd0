"""Chunk framing: digests, sizes, splitting chunks into messages and putting them together.

No torch here: KV crosses this boundary as bytes or numpy arrays in the canonical layout
[2, num_layers, tokens, num_kv_heads * head_dim] (K then V), little-endian, C order.
bfloat16 and float8 have no numpy dtype, so they travel as uint16 / uint8 words.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import blake3
import numpy as np

from cwm_client import pb
from cwm_client.buffers import BufferPool
from cwm_client.errors import InvalidArgument

M = TypeVar("M")

DIGEST_SIZE = 32
DEFAULT_CHUNK_TOKENS = 256
DEFAULT_PART_BYTES = 1 << 20

DTYPE_SIZE: dict[int, int] = {
    pb.KvDtype.KV_DTYPE_FLOAT32: 4,
    pb.KvDtype.KV_DTYPE_FLOAT16: 2,
    pb.KvDtype.KV_DTYPE_BFLOAT16: 2,
    pb.KvDtype.KV_DTYPE_FLOAT8_E4M3: 1,
    pb.KvDtype.KV_DTYPE_FLOAT8_E5M2: 1,
}

_NUMPY_WORD: dict[int, str] = {
    pb.KvDtype.KV_DTYPE_FLOAT32: "<f4",
    pb.KvDtype.KV_DTYPE_FLOAT16: "<f2",
    pb.KvDtype.KV_DTYPE_BFLOAT16: "<u2",
    pb.KvDtype.KV_DTYPE_FLOAT8_E4M3: "u1",
    pb.KvDtype.KV_DTYPE_FLOAT8_E5M2: "u1",
}


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """BLAKE3-256 of the raw canonical bytes: a chunk's identity."""
    return blake3.blake3(data).digest()


def dtype_size(fingerprint: pb.ModelFingerprint) -> int:
    """Bytes per KV element; raises INVALID_ARGUMENT when the dtype is not set."""
    size = DTYPE_SIZE.get(fingerprint.kv_dtype)
    if size is None:
        raise InvalidArgument("fingerprint.kv_dtype must be set", field="fingerprint.kv_dtype")
    return size


def bytes_per_token(fingerprint: pb.ModelFingerprint) -> int:
    """KV bytes one token occupies across all layers, K and V."""
    return (
        2
        * fingerprint.num_layers
        * fingerprint.num_kv_heads
        * fingerprint.head_dim
        * dtype_size(fingerprint)
    )


def chunk_raw_size(fingerprint: pb.ModelFingerprint, token_count: int) -> int:
    """The exact raw size a chunk of `token_count` tokens must have."""
    return bytes_per_token(fingerprint) * token_count


def token_spans(total_tokens: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """(token_start, token_count) of every chunk of a window."""
    if chunk_tokens <= 0:
        raise InvalidArgument("chunk_tokens must be positive", field="chunk_tokens")
    return [
        (start, min(chunk_tokens, total_tokens - start))
        for start in range(0, total_tokens, chunk_tokens)
    ]


class ChunkPayload(Protocol):
    """What a freeze needs of a chunk: its identity up front, its bytes when sent."""

    @property
    def index(self) -> int: ...
    @property
    def token_start(self) -> int: ...
    @property
    def token_count(self) -> int: ...
    @property
    def digest(self) -> bytes: ...
    @property
    def raw_size(self) -> int: ...

    def data(self) -> bytes | memoryview:
        """The raw canonical bytes (read lazily: large windows need not sit in memory)."""
        ...


@dataclass(frozen=True)
class InMemoryChunk:
    """A chunk whose raw bytes are already in memory."""

    index: int
    token_start: int
    token_count: int
    raw: bytes
    digest: bytes = field(default=b"")

    def __post_init__(self) -> None:
        if not self.digest:
            object.__setattr__(self, "digest", digest(self.raw))

    @property
    def raw_size(self) -> int:
        return len(self.raw)

    def data(self) -> bytes:
        return self.raw


def chunks_from_bytes(
    chunk_bytes: Sequence[bytes],
    chunk_tokens: int,
    total_tokens: int,
    digests: Sequence[bytes] | None = None,
) -> list[InMemoryChunk]:
    """Wrap already-canonical per-chunk byte strings, computing spans and digests (or taking
    `digests`, one per chunk, from a caller that has just computed them)."""
    spans = token_spans(total_tokens, chunk_tokens)
    if len(spans) != len(chunk_bytes):
        raise InvalidArgument(
            f"{total_tokens} tokens in chunks of {chunk_tokens} need {len(spans)} chunks, "
            f"got {len(chunk_bytes)}"
        )
    if digests is not None and len(digests) != len(chunk_bytes):
        raise InvalidArgument(f"{len(chunk_bytes)} chunks but {len(digests)} digests")
    known = list(digests) if digests is not None else [b""] * len(chunk_bytes)
    return [
        InMemoryChunk(index=i, token_start=start, token_count=count, raw=data, digest=d)
        for i, ((start, count), data, d) in enumerate(zip(spans, chunk_bytes, known, strict=True))
    ]


def chunks_from_array(kv: np.ndarray, chunk_tokens: int) -> list[InMemoryChunk]:
    """Cut a whole window's KV array [2, L, T, H*D] into canonical chunks."""
    if kv.ndim != 4 or kv.shape[0] != 2:
        raise InvalidArgument(f"expected KV shape [2, L, T, H*D], got {list(kv.shape)}")
    total = kv.shape[2]
    little = kv.astype(kv.dtype.newbyteorder("<"), copy=False)
    pieces = [
        np.ascontiguousarray(little[:, :, start : start + count, :]).tobytes()
        for start, count in token_spans(total, chunk_tokens)
    ]
    return chunks_from_bytes(pieces, chunk_tokens, total)


def array_from_chunk(
    raw: bytes | memoryview, fingerprint: pb.ModelFingerprint, token_count: int
) -> np.ndarray:
    """View raw chunk bytes as [2, L, tokens, H*D] (bfloat16/float8 as uint words)."""
    word = _NUMPY_WORD[fingerprint.kv_dtype]
    return np.frombuffer(raw, dtype=word).reshape(
        2,
        fingerprint.num_layers,
        token_count,
        fingerprint.num_kv_heads * fingerprint.head_dim,
    )


def fill_parts(
    new_message: Callable[[], tuple[M, pb.Chunk]],
    meta: pb.ChunkRef | ChunkPayload,
    encoded: bytes | memoryview,
    codec: int,
    part_bytes: int = DEFAULT_PART_BYTES,
    index: int | None = None,
) -> Iterator[M]:
    """Yield the messages that carry one chunk, `part_bytes` of data each at most.

    `new_message` returns a fresh message and the Chunk inside it to fill, so a
    FreezeRequest or ThawResponse is built in place: the chunk bytes are copied once, into
    the message, instead of once into a Chunk and again when the Chunk is put into its
    envelope. A chunk that fits one part is not sliced (no copy before that one); the
    parts of a larger one are slices of a memoryview, copied once each.
    """
    view = encoded if isinstance(encoded, bytes) else memoryview(encoded)
    total = len(view)
    offset = 0
    position = meta.index if index is None else index
    while True:
        message, part = new_message()
        part.index = position
        part.token_start = meta.token_start
        part.token_count = meta.token_count
        part.digest = meta.digest
        part.codec = codec  # type: ignore[assignment]
        part.raw_size = meta.raw_size
        part.encoded_size = total
        part.data_offset = offset
        if offset == 0 and total <= part_bytes and isinstance(view, bytes):
            part.data = view
            offset = total
        else:
            piece = memoryview(view)[offset : offset + part_bytes]
            part.data = bytes(piece)
            offset += len(piece)
        yield message
        if offset >= total:
            return


def _bare_chunk() -> tuple[pb.Chunk, pb.Chunk]:
    chunk = pb.Chunk()
    return chunk, chunk


def iter_parts(
    meta: pb.ChunkRef | ChunkPayload,
    encoded: bytes | memoryview,
    codec: int,
    part_bytes: int = DEFAULT_PART_BYTES,
    index: int | None = None,
) -> Iterator[pb.Chunk]:
    """Yield the Chunk messages that carry one chunk, `part_bytes` of data each at most
    (see `fill_parts`, which builds them inside their envelope message instead)."""
    return fill_parts(_bare_chunk, meta, encoded, codec, part_bytes, index)


@dataclass
class AssembledChunk:
    """A whole chunk put back together from its parts (still encoded with `codec`)."""

    index: int
    token_start: int
    token_count: int
    digest: bytes
    codec: int
    raw_size: int
    data: bytes


@dataclass(frozen=True)
class _PartHead:
    index: int
    token_start: int
    token_count: int
    digest: bytes
    codec: int
    raw_size: int
    encoded_size: int


class ChunkAssembler:
    """Puts chunk parts back together, refusing anything inconsistent.

    Feed parts in stream order; `add` returns the finished chunk when its last part arrives.
    Errors are INVALID_ARGUMENT naming the chunk index, since they are the sender's fault.
    """

    def __init__(self, max_encoded_size: int, pool: BufferPool | None = None) -> None:
        """`pool`: where a chunk of several parts is joined (reused buffers: for a client
        that drops each chunk before it takes many more, see `cwm_client.buffers`)."""
        self._max = max_encoded_size
        self._pool = pool
        self._head: _PartHead | None = None
        self._parts: list[bytes] = []
        self._filled = 0

    @property
    def in_progress(self) -> bool:
        return self._head is not None

    def add(self, part: pb.Chunk) -> AssembledChunk | None:
        data = part.data  # a bytes field is copied out of the message on every read: once
        if self._head is None:
            self._start(part)
            if part.data_offset != 0:
                raise InvalidArgument(
                    f"chunk {part.index}: first part starts at offset {part.data_offset}, "
                    "expected 0",
                    field="chunk.data_offset",
                )
            if len(data) == part.encoded_size:
                return self._finish(data)
        else:
            self._check_continuation(part)
        head = self._head
        assert head is not None
        end = self._filled + len(data)
        if end > head.encoded_size:
            raise InvalidArgument(
                f"chunk {part.index}: parts exceed encoded_size {head.encoded_size}",
                field="chunk.data",
            )
        # Parts are kept as they came and joined once at the end: one copy of the chunk,
        # where filling a buffer and turning it into bytes would be two.
        self._parts.append(data)
        self._filled = end
        if end == head.encoded_size:
            return self._finish(self._joined())
        return None

    def _joined(self) -> bytes:
        if self._pool is None:
            return b"".join(self._parts)
        data, view = self._pool.take(self._filled)
        offset = 0
        for part in self._parts:
            view[offset : offset + len(part)] = part
            offset += len(part)
        view.release()
        return data  # type: ignore[return-value]  # bytes (a bytearray off CPython)

    def _start(self, part: pb.Chunk) -> None:
        if len(part.digest) != DIGEST_SIZE:
            raise InvalidArgument(
                f"chunk {part.index}: digest must be {DIGEST_SIZE} bytes of BLAKE3, "
                f"got {len(part.digest)}",
                field="chunk.digest",
            )
        if part.codec == pb.ChunkCodec.CHUNK_CODEC_UNSPECIFIED:
            raise InvalidArgument(f"chunk {part.index}: codec must be set", field="chunk.codec")
        if part.encoded_size == 0 or part.encoded_size > self._max:
            raise InvalidArgument(
                f"chunk {part.index}: encoded_size {part.encoded_size} outside 1..{self._max}",
                field="chunk.encoded_size",
            )
        if part.codec == pb.ChunkCodec.CHUNK_CODEC_RAW and part.encoded_size != part.raw_size:
            raise InvalidArgument(
                f"chunk {part.index}: raw codec but encoded_size {part.encoded_size} != "
                f"raw_size {part.raw_size}",
                field="chunk.encoded_size",
            )
        # The fields only: holding the message would hold its data too, a second copy.
        self._head = _PartHead(
            index=part.index,
            token_start=part.token_start,
            token_count=part.token_count,
            digest=part.digest,
            codec=part.codec,
            raw_size=part.raw_size,
            encoded_size=part.encoded_size,
        )
        self._parts = []
        self._filled = 0

    def _check_continuation(self, part: pb.Chunk) -> None:
        head = self._head
        assert head is not None
        if (
            part.index != head.index
            or part.digest != head.digest
            or part.encoded_size != head.encoded_size
            or part.codec != head.codec
        ):
            raise InvalidArgument(
                f"chunk {part.index} started before chunk {head.index} was complete "
                f"({self._filled} of {head.encoded_size} bytes)",
                field="chunk.index",
            )
        if part.data_offset != self._filled:
            raise InvalidArgument(
                f"chunk {part.index}: part at offset {part.data_offset}, expected {self._filled}",
                field="chunk.data_offset",
            )

    def _finish(self, data: bytes) -> AssembledChunk:
        head = self._head
        assert head is not None
        self._head = None
        self._parts = []
        self._filled = 0
        return AssembledChunk(
            index=head.index,
            token_start=head.token_start,
            token_count=head.token_count,
            digest=head.digest,
            codec=head.codec,
            raw_size=head.raw_size,
            data=data,
        )
