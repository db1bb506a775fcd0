"""Lossless chunk codecs.

KV tensors are floats whose high (sign+exponent) bytes repeat a lot while mantissa bytes are
noise. Splitting the words into byte planes before compressing lets the compressor see the
repeating plane as one run. The word size is the KV dtype's: 2 for bfloat16/float16, 4 for
float32, 1 for float8 (one plane: the split is a no-op).

- `BYTEPLANE_ZSTD`: byte planes + zstd, the best ratio; what the manager stores on disk when
  it pays.
- `LZ4` / `BYTEPLANE_LZ4`: the LZ4 block format (no size prefix: the chunk's raw_size is the
  decoded size), several times faster both ways and less compact; the fast option for a wire.
- `ZSTD`: zstd over the raw bytes.

The decoded bytes are always checked against the raw digest by the caller, so a codec bug
shows up as DATA_LOSS, never as wrong KV; corrupt input raises ValueError here.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import lz4.block
import numpy as np
import zstandard

from cwm_client import pb

RAW = pb.ChunkCodec.CHUNK_CODEC_RAW
ZSTD = pb.ChunkCodec.CHUNK_CODEC_ZSTD
BYTEPLANE_ZSTD = pb.ChunkCodec.CHUNK_CODEC_BYTEPLANE_ZSTD
LZ4 = pb.ChunkCodec.CHUNK_CODEC_LZ4
BYTEPLANE_LZ4 = pb.ChunkCodec.CHUNK_CODEC_BYTEPLANE_LZ4

CODECS: frozenset[int] = frozenset({RAW, ZSTD, BYTEPLANE_ZSTD, LZ4, BYTEPLANE_LZ4})
"""Every codec this module encodes and decodes."""

CODEC_NAMES: dict[int, str] = {
    RAW: "raw",
    ZSTD: "zstd",
    BYTEPLANE_ZSTD: "byteplane-zstd",
    LZ4: "lz4",
    BYTEPLANE_LZ4: "byteplane-lz4",
}

DISK_CODEC = BYTEPLANE_ZSTD
"""What the manager stores a chunk with when compressing pays: the best ratio on KV."""

MIN_SAVING = 0.10
"""A chunk is stored or sent encoded only when that makes it at least this much smaller."""

SAMPLE_BYTES = 64 << 10
"""How much of a chunk (of at least twice this) `encode_if_smaller` tries first, so
incompressible chunks (random or dense KV) cost a fraction of a full compression."""

_ZSTD_LEVEL = 1
_local = threading.local()


def codec_name(codec: int) -> str:
    return CODEC_NAMES.get(codec, f"codec {codec}")


def parse_codec(name: str) -> int:
    """A codec from its name ("lz4", "byteplane-zstd", ...) or its enum name."""
    wanted = name.strip().lower().replace("_", "-")
    for codec, known in CODEC_NAMES.items():
        if wanted in (known, f"chunk-codec-{known}"):
            return codec
    raise ValueError(f"unknown codec {name!r}; known: {', '.join(CODEC_NAMES.values())}")


def _zstd_compressor() -> zstandard.ZstdCompressor:
    # Compressor contexts are not thread-safe and cost a few allocations to make: one per
    # thread, reused.
    compressor = getattr(_local, "zstd_c", None)
    if compressor is None:
        compressor = _local.zstd_c = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    return compressor


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    decompressor = getattr(_local, "zstd_d", None)
    if decompressor is None:
        decompressor = _local.zstd_d = zstandard.ZstdDecompressor()
    return decompressor


# -- byte planes -------------------------------------------------------------------------


def split_planes(raw: bytes | bytearray | memoryview, word: int) -> bytes | memoryview:
    """Words [w0 w1 ..] of `word` bytes -> planes [all byte 0s][all byte 1s]...

    Shifts over whole words (numpy) rather than a strided transpose: ~4x faster for 2- and
    4-byte words. Returns `raw` itself when there is nothing to split.
    """
    if word <= 1 or len(raw) % word or not len(raw):
        return raw if isinstance(raw, bytes | memoryview) else memoryview(raw)
    count = len(raw) // word
    out = np.empty(len(raw), dtype=np.uint8)
    if word in (2, 4):
        words = np.frombuffer(raw, dtype=f"<u{word}")
        for plane in range(word):
            np.right_shift(
                words, 8 * plane, out=out[plane * count : (plane + 1) * count], casting="unsafe"
            )
    else:
        columns = np.frombuffer(raw, dtype=np.uint8).reshape(count, word)
        rows = out.reshape(word, count)
        for plane in range(word):
            rows[plane] = columns[:, plane]
    return out.tobytes()


def join_planes(planes: bytes | memoryview, word: int) -> bytes:
    """The inverse of `split_planes`."""
    if word <= 1 or len(planes) % word or not len(planes):
        return planes if isinstance(planes, bytes) else bytes(planes)
    count = len(planes) // word
    flat = np.frombuffer(planes, dtype=np.uint8)
    if word in (2, 4):
        wide = f"<u{word}"
        words = np.empty(count, dtype=wide)
        np.copyto(words, flat[:count], casting="unsafe")
        shifted = np.empty(count, dtype=wide)
        for plane in range(1, word):
            np.left_shift(
                flat[plane * count : (plane + 1) * count], 8 * plane, out=shifted, dtype=wide
            )
            words |= shifted
        return words.tobytes()
    rows = flat.reshape(word, count)
    columns = np.empty((count, word), dtype=np.uint8)
    for plane in range(word):
        columns[:, plane] = rows[plane]
    return columns.tobytes()


# -- encode / decode ---------------------------------------------------------------------


def encode(raw: bytes | bytearray | memoryview, codec: int, word_size: int) -> bytes:
    """Encode raw chunk bytes with `codec` (RAW returns `raw` itself when it is bytes)."""
    if codec == RAW:
        return raw if isinstance(raw, bytes) else bytes(raw)
    if codec == ZSTD:
        return _zstd_compressor().compress(raw)
    if codec == BYTEPLANE_ZSTD:
        return _zstd_compressor().compress(split_planes(raw, word_size))
    if codec in (LZ4, BYTEPLANE_LZ4):
        source = split_planes(raw, word_size) if codec == BYTEPLANE_LZ4 else raw
        packed: bytes = lz4.block.compress(source, store_size=False)
        return packed
    raise ValueError(f"unknown codec {codec}")


def decode(
    data: bytes | bytearray | memoryview, codec: int, raw_size: int, word_size: int
) -> bytes:
    """Decode bytes produced by `encode`; raises ValueError on corrupt input."""
    if codec == RAW:
        out = data if isinstance(data, bytes) else bytes(data)
    elif codec in (ZSTD, BYTEPLANE_ZSTD):
        try:
            out = _zstd_decompressor().decompress(data, max_output_size=raw_size)
        except zstandard.ZstdError as exc:
            raise ValueError(f"corrupt compressed chunk: {exc}") from exc
    elif codec in (LZ4, BYTEPLANE_LZ4):
        if not len(data):
            raise ValueError("corrupt compressed chunk: no data")
        try:
            out = lz4.block.decompress(data, uncompressed_size=raw_size)
        except lz4.block.LZ4BlockError as exc:
            raise ValueError(f"corrupt compressed chunk: {exc}") from exc
    else:
        raise ValueError(f"unknown codec {codec}")
    if len(out) != raw_size:
        raise ValueError(f"decoded {len(out)} bytes, expected {raw_size}")
    if codec in (BYTEPLANE_ZSTD, BYTEPLANE_LZ4):
        return join_planes(out, word_size)
    return out


def pays(encoded_size: int, raw_size: int, min_saving: float = MIN_SAVING) -> bool:
    """Whether an encoding saves at least `min_saving` of the raw size."""
    return encoded_size <= raw_size * (1.0 - min_saving)


def encode_if_smaller(
    raw: bytes | memoryview,
    word_size: int,
    min_saving: float = MIN_SAVING,
    codec: int = DISK_CODEC,
) -> tuple[int, bytes | memoryview]:
    """Encode with `codec` (byte planes + zstd by default) only when that saves at least
    `min_saving`; otherwise (RAW, raw) with no copy.

    A 64 KiB sample is tried first, so incompressible chunks (random or already dense KV)
    cost a small fraction of a full compression. Storing those raw also spares every thaw
    the decode cost.
    """
    if codec == RAW:
        return RAW, raw
    if len(raw) >= 2 * SAMPLE_BYTES:
        sample = memoryview(raw)[: SAMPLE_BYTES - SAMPLE_BYTES % max(word_size, 1)]
        if not pays(len(encode(sample, codec, word_size)), len(sample), min_saving):
            return RAW, raw
    packed = encode(raw, codec, word_size)
    if pays(len(packed), len(raw), min_saving):
        return codec, packed
    return RAW, raw


def encode_for_wire(
    raw: bytes | memoryview, accepted: Iterable[int], word_size: int
) -> tuple[int, bytes | memoryview]:
    """The first codec of `accepted` that pays for this chunk, else RAW (always accepted)."""
    for codec in accepted:
        if codec == RAW:
            break
        if codec in CODECS:
            chosen, data = encode_if_smaller(raw, word_size, codec=codec)
            if chosen != RAW:
                return chosen, data
    return RAW, raw
