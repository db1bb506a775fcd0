"""ChunkStore, the only way into the tiers, on real tiers in a tmp dir: what enters is
verified first, what leaves is verified, sealing and the sender's encoding are handled in one
place, and the metrics hear every hit and miss. The tiers' one verb set is checked on each
tier (Redis on a real redis-server)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from cwm_client import codecs
from cwm_client.chunks import digest as blake3_digest
from cwm_client.errors import DataLoss, FailedPrecondition
from cwm_server.manager.metrics import StoreMetrics
from cwm_server.manager.tiers.base import ChunkCorrupt, ChunkTier
from cwm_server.manager.tiers.disk import TMP_SUFFIX, DiskTier
from cwm_server.manager.tiers.format import HEADER_SIZE, StoredChunk, unpack_header
from cwm_server.manager.tiers.memory import MemoryTier
from cwm_server.manager.tiers.sealing import SEALED, Keyring
from cwm_server.manager.tiers.store import ChunkStore

KEY_HEX = "hex:" + "11" * 32


def _store(tmp_path: Path, memory_bytes: int = 1 << 20, compress: bool = False) -> ChunkStore:
    return ChunkStore(DiskTier(tmp_path), MemoryTier(memory_bytes), compress=compress)


def _metrics(store: ChunkStore) -> CollectorRegistry:
    registry = CollectorRegistry()
    store.observer = StoreMetrics(registry)
    return registry


def _count(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def _compressible(size: int = 256 << 10) -> bytes:
    """bf16-like words whose high bytes repeat: byte planes + zstd shrink them well."""
    return bytes(i % 7 for i in range(size))


def test_put_refuses_a_digest_mismatch_and_stores_nothing(tmp_path: Path) -> None:
    store = _store(tmp_path)
    raw = os.urandom(64 << 10)
    wrong = blake3_digest(b"other bytes")
    with pytest.raises(DataLoss) as refused:
        store.put("t", wrong, raw, 2, "chunk 7")
    assert refused.value.reason == "DIGEST_MISMATCH"
    assert refused.value.field == "chunk.data"
    assert refused.value.message.startswith("chunk 7: its bytes do not match")
    assert not store.chunk_path("t", wrong).exists()
    assert store.get_from_memory("t", wrong) is None
    with pytest.raises(DataLoss) as missing:
        store.get("t", wrong, "window 'w' chunk 7")
    assert missing.value.reason == "CHUNK_MISSING"


def test_put_names_the_field_and_subject_its_caller_gives(tmp_path: Path) -> None:
    with pytest.raises(DataLoss) as refused:
        _store(tmp_path).put("t", bytes(32), b"value", 1, "the value of key 'k'", field="part.data")
    assert refused.value.field == "part.data" and refused.value.reason == "DIGEST_MISMATCH"
    assert "the value of key 'k'" in refused.value.message


def test_get_falls_from_memory_to_disk_and_counts_both(tmp_path: Path) -> None:
    store = _store(tmp_path)
    registry = _metrics(store)
    raw = os.urandom(64 << 10)
    digest = blake3_digest(raw)
    result = store.put("t", digest, raw, 2, "chunk 0")
    assert result.raw_size == len(raw) and result.codec == codecs.RAW
    assert (
        result.stored_size == HEADER_SIZE + len(raw) == store.chunk_path("t", digest).stat().st_size
    )

    assert store.get("t", digest, "w") == raw  # from memory
    assert _count(registry, "cwm_tier_hits_total", tier="memory") == 1
    assert _count(registry, "cwm_tier_hits_total", tier="disk") == 0

    fresh = _store(tmp_path)  # the same disk, an empty memory tier
    registry = _metrics(fresh)
    assert fresh.get("t", digest, "w") == raw
    assert _count(registry, "cwm_tier_misses_total", tier="memory") == 1
    assert _count(registry, "cwm_tier_hits_total", tier="disk") == 1
    assert fresh.get_from_memory("t", digest) == raw  # the verified disk copy entered memory


def test_a_corrupt_disk_copy_is_data_loss_and_never_served(tmp_path: Path) -> None:
    store = _store(tmp_path, memory_bytes=0)
    raw = os.urandom(64 << 10)
    digest = blake3_digest(raw)
    store.put("t", digest, raw, 2, "chunk 0")
    path = store.chunk_path("t", digest)
    data = bytearray(path.read_bytes())
    data[HEADER_SIZE + 100] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DataLoss) as refused:
        store.get("t", digest, "window 'w' chunk 0")
    assert refused.value.reason == "CHUNK_CORRUPT" and "window 'w' chunk 0" in refused.value.message
    with pytest.raises(ChunkCorrupt) as why:
        store.check_disk_copy("t", digest)
    assert why.value.why == "digest mismatch"
    assert store.verified_on_disk("t", digest) is None
    assert store.get_as_stored("t", digest, {codecs.RAW}) is None


def test_a_truncated_header_is_corrupt_not_missing(tmp_path: Path) -> None:
    store = _store(tmp_path, memory_bytes=0)
    raw = os.urandom(4096)
    digest = blake3_digest(raw)
    store.put("t", digest, raw, 1, "chunk 0")
    store.chunk_path("t", digest).write_bytes(b"CWMC")
    with pytest.raises(ChunkCorrupt) as why:
        store.check_disk_copy("t", digest)
    assert why.value.why == "truncated header"
    with pytest.raises(DataLoss) as refused:
        store.get("t", digest, "w")
    assert refused.value.reason == "CHUNK_CORRUPT"


def test_sealing_round_trip_keeps_only_ciphertext_on_disk(tmp_path: Path) -> None:
    store = _store(tmp_path, memory_bytes=0)
    store.keyring = Keyring.from_mapping(
        {"tenants": {"t": {"active": "k1", "keys": {"k1": KEY_HEX}}}}
    )
    raw = b"plaintext KV run " * 4096
    digest = blake3_digest(raw)
    result = store.put("t", digest, raw, 2, "chunk 0")
    stored = store.chunk_path("t", digest).read_bytes()
    codec, _, raw_size = unpack_header(stored[:HEADER_SIZE])
    assert codec & SEALED and result.codec == codec & ~SEALED and raw_size == len(raw)
    assert b"plaintext KV run" not in stored
    assert result.stored_size == len(stored)
    assert store.get("t", digest, "w") == raw
    described = store.described_on_disk("t", digest)
    assert described is not None and described.codec == result.codec

    keyless = _store(tmp_path, memory_bytes=0)
    with pytest.raises(FailedPrecondition) as refused:
        keyless.get("t", digest, "w")
    assert refused.value.reason == "ENCRYPTION_KEY_UNAVAILABLE"
    assert refused.value.metadata == {"tenant": "t", "key_id": "k1"}
    with pytest.raises(FailedPrecondition):
        keyless.check_disk_copy("t", digest)
    assert keyless.described_on_disk("t", digest) == described  # the header needs no key


def test_a_broken_seal_is_corrupt(tmp_path: Path) -> None:
    store = _store(tmp_path, memory_bytes=0)
    store.keyring = Keyring.from_mapping(
        {"tenants": {"t": {"active": "k1", "keys": {"k1": KEY_HEX}}}}
    )
    raw = os.urandom(8192)
    digest = blake3_digest(raw)
    store.put("t", digest, raw, 1, "chunk 0")
    path = store.chunk_path("t", digest)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the GCM tag
    path.write_bytes(bytes(data))
    with pytest.raises(ChunkCorrupt) as why:
        store.check_disk_copy("t", digest)
    assert "failed authentication" in why.value.why
    with pytest.raises(DataLoss) as refused:
        store.get("t", digest, "w")
    assert refused.value.reason == "CHUNK_CORRUPT"


def test_the_senders_encoding_is_stored_as_it_came_when_it_pays(tmp_path: Path) -> None:
    store = _store(tmp_path, compress=True)
    raw = _compressible()
    digest = blake3_digest(raw)
    sent = codecs.encode(raw, codecs.LZ4, 2)
    assert codecs.pays(len(sent), len(raw))
    result = store.put("t", digest, raw, 2, "chunk 0", received=(codecs.LZ4, sent))
    assert result.codec == codecs.LZ4  # not compressed again with the store's own codec
    assert store.chunk_path("t", digest).read_bytes()[HEADER_SIZE:] == sent
    assert store.get("t", digest, "w") == raw


def test_raw_bytes_are_compressed_by_the_store_when_that_pays(tmp_path: Path) -> None:
    raw = _compressible()
    digest = blake3_digest(raw)
    compressing = _store(tmp_path / "on", compress=True)
    result = compressing.put("t", digest, raw, 2, "chunk 0", received=(codecs.RAW, raw))
    assert result.codec == codecs.DISK_CODEC and result.stored_size < len(raw)
    plain = _store(tmp_path / "off", compress=False)
    sent = codecs.encode(raw, codecs.LZ4, 2)
    result = plain.put("t", digest, raw, 2, "chunk 0", received=(codecs.LZ4, sent))
    assert result.codec == codecs.RAW  # compression off: stored raw whatever was sent


def test_get_as_stored_sends_an_accepted_codec_as_it_rests(tmp_path: Path) -> None:
    raw = _compressible()
    digest = blake3_digest(raw)
    _store(tmp_path, compress=True).put("t", digest, raw, 2, "chunk 0")
    store = _store(tmp_path)
    registry = _metrics(store)
    assert store.get_as_stored("t", digest, {codecs.LZ4}) is None  # not the stored codec
    stored = store.get_as_stored("t", digest, {codecs.DISK_CODEC})
    assert stored is not None and stored.codec == codecs.DISK_CODEC
    assert codecs.decode(stored.data, stored.codec, stored.raw_size, stored.word_size) == raw
    assert _count(registry, "cwm_tier_hits_total", tier="disk") == 1
    assert _count(registry, "cwm_chunk_verify_seconds_count", op="load") == 1
    assert store.get_from_memory("t", digest) == raw
    assert store.get_as_stored("t", bytes(32), {codecs.DISK_CODEC}) is None  # no such file


def test_verified_on_disk_reports_how_the_chunk_is_stored(tmp_path: Path) -> None:
    store = _store(tmp_path, compress=True)
    raw = _compressible()
    digest = blake3_digest(raw)
    put = store.put("t", digest, raw, 2, "chunk 0")
    assert store.verified_on_disk("t", digest) == put
    assert store.verified_on_disk("t", bytes(32)) is None


def test_remove_drops_a_chunk_from_memory_and_disk(tmp_path: Path) -> None:
    store = _store(tmp_path)
    raw = os.urandom(4096)
    digest = blake3_digest(raw)
    store.put("t", digest, raw, 1, "chunk 0")
    store.remove("t", digest)
    assert store.get_from_memory("t", digest) is None
    assert not store.chunk_path("t", digest).exists()


def test_disk_files_tells_chunk_temp_and_stray_files_apart(tmp_path: Path) -> None:
    store = _store(tmp_path)
    raw = os.urandom(4096)
    digest = blake3_digest(raw)
    store.put("t", digest, raw, 1, "chunk 0")
    chunk = store.chunk_path("t", digest)
    (chunk.parent / f"{digest.hex()}.1.2{TMP_SUFFIX}").write_bytes(b"half")
    (chunk.parent / "notes.txt").write_bytes(b"stray")
    files = {file.path.name: file for file in store.disk_files()}
    assert files[digest.hex()].digest == digest and files[digest.hex()].tenant == "t"
    assert files[f"{digest.hex()}.1.2{TMP_SUFFIX}"].temp
    assert files["notes.txt"].digest is None and not files["notes.txt"].temp


# -- the one verb set, on every tier ----------------------------------------------------------


@pytest.fixture(params=["memory", "disk", "redis"])
def tier(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ChunkTier[Any]]:
    if request.param == "memory":
        yield MemoryTier(1 << 20)
    elif request.param == "disk":
        yield DiskTier(tmp_path)
    else:
        from cwm_server.manager.tiers.redis import RedisTier
        from cwm_server.manager.tiers.redis_link import RedisLink

        server = request.getfixturevalue("redis_server")
        link = RedisLink([server.url])
        yield RedisTier(link)
        link.close()


def _payload(tier: ChunkTier[Any], data: bytes) -> Any:
    return data if isinstance(tier, MemoryTier) else StoredChunk(codecs.RAW, 1, len(data), data)


def _bytes_of(found: Any) -> bytes:
    return bytes(found if isinstance(found, bytes) else found.data)


def test_every_tier_writes_reads_contains_and_removes(tier: ChunkTier[Any]) -> None:
    first, second = os.urandom(4096), os.urandom(2048)
    a, b, absent = blake3_digest(first), blake3_digest(second), bytes(32)
    assert tier.read("t", a) is None
    assert tier.write("t", a, _payload(tier, first)) >= len(first)
    tier.write("t", b, _payload(tier, second))
    assert _bytes_of(tier.read("t", a)) == first and _bytes_of(tier.read("t", b)) == second
    assert tier.read("other tenant", a) is None  # scoped by tenant
    assert tier.contains("t", [a, b, absent]) == {a, b}
    tier.remove("t", [a, absent])
    assert tier.read("t", a) is None and tier.contains("t", [a, b]) == {b}
    tier.remove("t", [])
    assert tier.contains("t", [b]) == {b}
