"""Lossless chunk codecs: every codec round-trips every KV dtype bit for bit, corrupt input
is an error (never wrong KV), and the manager refuses what does not decode or verify."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cwm_client import WindowClient, chunks_from_bytes, codecs, pb
from cwm_client.channels import CHANNEL_OPTIONS
from cwm_client.chunks import DTYPE_SIZE, digest, iter_parts
from cwm_client.errors import DataLoss, InvalidArgument, from_rpc_error
from cwm_client.windows.freeze_stream import build_header
from tests.helpers import FINGERPRINT, ThreadedManager, token_ids

ALL = sorted(codecs.CODECS)
COMPRESSED = [c for c in ALL if c != codecs.RAW]


def _kv_words(dtype: int, count: int, seed: int = 0) -> bytes:
    """KV-like values (normal, a few outliers) in the dtype's canonical little-endian words."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(count).astype(np.float32)
    values[::97] *= 40.0
    if dtype == pb.KvDtype.KV_DTYPE_FLOAT32:
        return values.astype("<f4").tobytes()
    if dtype == pb.KvDtype.KV_DTYPE_FLOAT16:
        return values.astype("<f2").tobytes()
    if dtype == pb.KvDtype.KV_DTYPE_BFLOAT16:
        return (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    # float8 (e4m3 / e5m2): the top byte of the bf16 word is a fair stand-in for the bits.
    return (values.view(np.uint32) >> 24).astype(np.uint8).tobytes()


DTYPES = [
    pb.KvDtype.KV_DTYPE_FLOAT32,
    pb.KvDtype.KV_DTYPE_FLOAT16,
    pb.KvDtype.KV_DTYPE_BFLOAT16,
    pb.KvDtype.KV_DTYPE_FLOAT8_E4M3,
    pb.KvDtype.KV_DTYPE_FLOAT8_E5M2,
]


@pytest.mark.parametrize("codec", ALL, ids=codecs.codec_name)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: pb.KvDtype.Name(d))
@pytest.mark.parametrize("kind", ["kv", "random", "zeros"])
def test_every_codec_round_trips_every_dtype(codec: int, dtype: int, kind: str) -> None:
    word = DTYPE_SIZE[dtype]
    if kind == "kv":
        raw = _kv_words(dtype, 96 * 1024 // word)
    elif kind == "random":
        raw = np.random.default_rng(1).integers(0, 256, 96 * 1024, dtype=np.uint8).tobytes()
    else:
        raw = bytes(96 * 1024)
    for given_raw in (raw, memoryview(raw), bytearray(raw)):
        encoded = codecs.encode(given_raw, codec, word)
        assert codecs.decode(encoded, codec, len(raw), word) == raw
        assert codecs.decode(memoryview(encoded), codec, len(raw), word) == raw


@pytest.mark.parametrize("word", [1, 2, 3, 4, 8])
def test_byte_planes_are_split_and_joined_exactly(word: int) -> None:
    raw = np.random.default_rng(word).integers(0, 256, word * 1000, dtype=np.uint8).tobytes()
    planes = codecs.split_planes(raw, word)
    words = np.frombuffer(raw, dtype=np.uint8).reshape(-1, word)
    assert bytes(planes) == np.ascontiguousarray(words.T).tobytes()
    assert codecs.join_planes(planes, word) == raw


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=4096), word=st.sampled_from([1, 2, 4]), codec=st.sampled_from(ALL))
def test_any_bytes_round_trip(data: bytes, word: int, codec: int) -> None:
    encoded = codecs.encode(data, codec, word)
    assert codecs.decode(encoded, codec, len(data), word) == data


def test_planes_make_kv_smaller_and_random_stays_raw() -> None:
    kv = _kv_words(pb.KvDtype.KV_DTYPE_BFLOAT16, 512 * 1024)
    sizes = {codecs.codec_name(c): len(codecs.encode(kv, c, 2)) / len(kv) for c in ALL}
    assert sizes["byteplane-zstd"] < sizes["zstd"] < 0.85
    assert sizes["byteplane-lz4"] < sizes["lz4"]
    codec, stored = codecs.encode_if_smaller(kv, 2)
    assert codec == codecs.BYTEPLANE_ZSTD and len(stored) < 0.8 * len(kv)
    noise = np.random.default_rng(3).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    codec, stored = codecs.encode_if_smaller(noise, 2)
    assert codec == codecs.RAW and stored is noise  # no copy of what stays raw


def test_wire_choice_follows_the_preference_order() -> None:
    kv = _kv_words(pb.KvDtype.KV_DTYPE_BFLOAT16, 256 * 1024)
    assert codecs.encode_for_wire(kv, [codecs.LZ4, codecs.BYTEPLANE_LZ4], 2)[0] == (
        codecs.BYTEPLANE_LZ4  # plain lz4 does not pay on bf16 KV; the next one does
    )
    assert codecs.encode_for_wire(kv, [codecs.BYTEPLANE_ZSTD], 2)[0] == codecs.BYTEPLANE_ZSTD
    assert codecs.encode_for_wire(kv, [codecs.RAW, codecs.BYTEPLANE_ZSTD], 2)[0] == codecs.RAW
    assert codecs.encode_for_wire(kv, [], 2) == (codecs.RAW, kv)
    assert codecs.encode_for_wire(kv, [99], 2)[0] == codecs.RAW  # unknown: skipped


def test_codec_names_parse() -> None:
    for codec in ALL:
        assert codecs.parse_codec(codecs.codec_name(codec)) == codec
    assert codecs.parse_codec("CHUNK_CODEC_BYTEPLANE_LZ4") == codecs.BYTEPLANE_LZ4
    with pytest.raises(ValueError, match="unknown codec"):
        codecs.parse_codec("gzip")


@pytest.mark.parametrize("codec", COMPRESSED, ids=codecs.codec_name)
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "longer"])
def test_corrupt_input_is_an_error(codec: int, damage: str) -> None:
    raw = _kv_words(pb.KvDtype.KV_DTYPE_BFLOAT16, 64 * 1024)
    encoded = codecs.encode(raw, codec, 2)
    bad = {
        "truncated": encoded[: len(encoded) // 2],
        "garbage": bytes(range(256)) * 16,
        "empty": b"",
        "longer": encoded,
    }[damage]
    raw_size = len(raw) - 2 if damage == "longer" else len(raw)
    with pytest.raises(ValueError):
        codecs.decode(bad, codec, raw_size, 2)


@pytest.mark.parametrize("codec", ALL, ids=codecs.codec_name)
def test_a_flipped_byte_never_passes_as_the_chunk(codec: int) -> None:
    """Some damage decodes (no checksum inside the codecs); the digest is what catches it."""
    raw = _kv_words(pb.KvDtype.KV_DTYPE_BFLOAT16, 64 * 1024)
    encoded = bytearray(codecs.encode(raw, codec, 2))
    encoded[len(encoded) // 2] ^= 0x5A
    try:
        decoded = codecs.decode(bytes(encoded), codec, len(raw), 2)
    except ValueError:
        return
    assert digest(decoded) != digest(raw)


def test_unknown_codec_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown codec"):
        codecs.encode(b"abcd", 42, 2)
    with pytest.raises(ValueError, match="unknown codec"):
        codecs.decode(b"abcd", 42, 4, 2)


# -- through the manager ---------------------------------------------------------------------


def _compressible_chunks(count: int) -> list:  # type: ignore[type-arg]
    per_chunk = 256 * 2048  # FINGERPRINT: 2 KiB per token
    pieces = [_kv_words(pb.KvDtype.KV_DTYPE_BFLOAT16, per_chunk // 2, seed=i) for i in range(count)]
    return chunks_from_bytes(pieces, 256, 256 * count)


def _send(manager: ThreadedManager, requests: list[pb.FreezeRequest]) -> None:
    with grpc.insecure_channel(manager.target, options=CHANNEL_OPTIONS) as channel:
        try:
            pb.WindowServiceStub(channel).Freeze(iter(requests), timeout=30)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None


@pytest.mark.parametrize("codec", COMPRESSED, ids=codecs.codec_name)
def test_manager_refuses_a_compressed_chunk_that_does_not_decode(
    manager: ThreadedManager, codec: int
) -> None:
    (chunk,) = _compressible_chunks(1)
    encoded = codecs.encode(chunk.raw, codec, 2)
    header = build_header("bad", [chunk], fingerprint=FINGERPRINT, token_ids=token_ids(256))
    (part,) = iter_parts(chunk, encoded[: len(encoded) // 2], codec)
    with pytest.raises(InvalidArgument, match="does not decode"):
        _send(manager, [pb.FreezeRequest(header=header), pb.FreezeRequest(chunk=part)])
    assert not manager.manager.catalog.window_exists("default", "bad")


def test_manager_refuses_a_compressed_chunk_that_decodes_to_other_bytes(
    manager: ThreadedManager,
) -> None:
    first, second = _compressible_chunks(2)
    encoded = codecs.encode(second.raw, codecs.BYTEPLANE_ZSTD, 2)  # the wrong chunk's bytes
    header = build_header("bad", [first], fingerprint=FINGERPRINT, token_ids=token_ids(256))
    (part,) = iter_parts(first, encoded, codecs.BYTEPLANE_ZSTD)
    with pytest.raises(DataLoss, match="do not match"):
        _send(manager, [pb.FreezeRequest(header=header), pb.FreezeRequest(chunk=part)])
    assert not manager.manager.catalog.window_exists("default", "bad")


def test_stored_codec_is_recorded_per_chunk(client: WindowClient) -> None:
    chunks = _compressible_chunks(2)
    noise = np.random.default_rng(5).integers(0, 256, 256 * 2048, dtype=np.uint8).tobytes()
    mixed = chunks_from_bytes([chunks[0].raw, noise], 256, 512)
    client.freeze("mixed", mixed, fingerprint=FINGERPRINT, token_ids=token_ids(512))
    refs = client.get("mixed").chunks
    assert [r.stored_codec for r in refs] == [codecs.BYTEPLANE_ZSTD, codecs.RAW]
    assert refs[0].stored_size < 0.8 * refs[0].raw_size
    with client.thaw("mixed") as stream:
        assert [c.data for c in stream] == [chunks[0].raw, noise]
