"""Lossless chunk codecs.

KV tensors are floats whose high (sign+exponent) bytes repeat a lot while mantissa bytes are
noise. Splitting the words into byte planes before zstd lets the compressor see the repeating
plane as one run. The decoded bytes are always checked against the raw digest by the caller,
so a codec bug shows up as DATA_LOSS, never as wrong KV.
"""

from __future__ import annotations

import numpy as np
import zstandard

from cwm_client import pb

RAW = pb.ChunkCodec.CHUNK_CODEC_RAW
ZSTD = pb.ChunkCodec.CHUNK_CODEC_ZSTD
BYTEPLANE_ZSTD = pb.ChunkCodec.CHUNK_CODEC_BYTEPLANE_ZSTD

_ZSTD_LEVEL = 1


def _split_planes(raw: bytes | memoryview, word: int) -> bytes:
    if word <= 1 or len(raw) % word:
        return bytes(raw)
    words = np.frombuffer(raw, dtype=np.uint8).reshape(-1, word)
    return np.ascontiguousarray(words.T).tobytes()


def _join_planes(planes: bytes, word: int) -> bytes:
    if word <= 1 or len(planes) % word:
        return planes
    matrix = np.frombuffer(planes, dtype=np.uint8).reshape(word, -1)
    return np.ascontiguousarray(matrix.T).tobytes()


def encode(raw: bytes | memoryview, codec: int, word_size: int) -> bytes:
    """Encode raw chunk bytes with the given codec."""
    if codec == RAW:
        return bytes(raw)
    if codec == ZSTD:
        return zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(raw)
    if codec == BYTEPLANE_ZSTD:
        return zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(_split_planes(raw, word_size))
    raise ValueError(f"unknown codec {codec}")


def decode(data: bytes | memoryview, codec: int, raw_size: int, word_size: int) -> bytes:
    """Decode bytes produced by `encode`; raises ValueError on corrupt input."""
    if codec == RAW:
        return data if isinstance(data, bytes) else bytes(data)
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=raw_size)
    except zstandard.ZstdError as exc:
        raise ValueError(f"corrupt compressed chunk: {exc}") from exc
    if len(out) != raw_size:
        raise ValueError(f"decoded {len(out)} bytes, expected {raw_size}")
    if codec == ZSTD:
        return out
    if codec == BYTEPLANE_ZSTD:
        return _join_planes(out, word_size)
    raise ValueError(f"unknown codec {codec}")


def encode_if_smaller(
    raw: bytes | memoryview, word_size: int, min_saving: float = 0.10
) -> tuple[int, bytes | memoryview]:
    """Compress with byte planes + zstd only when that saves at least `min_saving`.

    A 64 KiB sample is tried first, so incompressible chunks (random or already dense KV)
    cost a small fraction of a full compression. Storing those raw also spares every thaw
    the decode cost.
    """
    sample_size = 64 << 10
    if len(raw) > 4 * sample_size:
        sample = memoryview(raw)[: sample_size - sample_size % max(word_size, 1)]
        if len(encode(sample, BYTEPLANE_ZSTD, word_size)) > len(sample) * (1.0 - min_saving):
            return RAW, raw
    packed = encode(raw, BYTEPLANE_ZSTD, word_size)
    if len(packed) <= len(raw) * (1.0 - min_saving):
        return BYTEPLANE_ZSTD, packed
    return RAW, raw
