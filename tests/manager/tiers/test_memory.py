"""The memory tier's seal: a hit is served only if its bytes are unchanged since they were
verified, and a changed entry falls through to the disk tier's BLAKE3-checked copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cwm_client import WindowClient
from cwm_client.chunks import digest as blake3_digest
from cwm_client.errors import DataLoss
from cwm_server.manager.tiers.disk import DiskTier
from cwm_server.manager.tiers.memory import MemoryTier
from cwm_server.manager.tiers.store import ChunkStore
from tests.helpers import FINGERPRINT, ThreadedManager, synthetic_chunks, token_ids


def _flip_in_memory(memory: MemoryTier, key: tuple[str, bytes]) -> None:
    """Simulate a bit flip: the entry's bytes change, its seal does not."""
    raw, seal = memory._items[key]
    flipped = bytearray(raw)
    flipped[len(flipped) // 2] ^= 0x01
    memory._items[key] = (bytes(flipped), seal)


def test_a_changed_entry_is_dropped_counted_and_not_served() -> None:
    memory = MemoryTier(1 << 20)
    raw = os.urandom(4096)
    key = ("t", blake3_digest(raw))
    memory.write(*key, raw)
    assert memory.read(*key) == raw
    _flip_in_memory(memory, key)
    assert memory.read(*key) is None
    assert memory.corrupt == 1
    assert len(memory) == 0 and memory.held_bytes == 0
    assert memory.read(*key) is None  # gone, not counted twice
    assert memory.corrupt == 1


def test_store_reads_the_disk_copy_when_memory_changed(tmp_path: Path) -> None:
    memory = MemoryTier(1 << 20)
    store = ChunkStore(DiskTier(tmp_path), memory, compress=False)
    raw = os.urandom(64 << 10)
    digest = blake3_digest(raw)
    store.put("t", digest, raw, 2, "chunk 0")
    _flip_in_memory(memory, ("t", digest))
    assert store.get("t", digest, "test") == raw
    assert memory.corrupt == 1
    assert memory.read("t", digest) == raw  # the verified disk copy took its place


def test_changed_memory_and_no_other_copy_is_data_loss(tmp_path: Path) -> None:
    memory = MemoryTier(1 << 20)
    disk = DiskTier(tmp_path)
    store = ChunkStore(disk, memory, compress=False)
    raw = os.urandom(64 << 10)
    digest = blake3_digest(raw)
    store.put("t", digest, raw, 2, "chunk 0")
    _flip_in_memory(memory, ("t", digest))
    disk.path_for("t", digest).unlink()
    with pytest.raises(DataLoss) as caught:
        store.get("t", digest, "window 'w' chunk 0")
    assert caught.value.reason == "CHUNK_MISSING"


def test_bytes_changed_between_their_check_and_the_put_are_caught() -> None:
    memory = MemoryTier(1 << 20)
    raw = os.urandom(4096)
    key = ("t", blake3_digest(raw))
    seal = memory.seal_for(raw)  # taken right after the BLAKE3 check
    flipped = bytearray(raw)
    flipped[0] ^= 0x80
    memory.write(*key, bytes(flipped), seal)  # changed before it was written
    assert memory.read(*key) is None and memory.corrupt == 1
    assert MemoryTier(100).seal_for(raw) is None  # too large to keep: no seal computed


def test_a_thaw_serves_the_disk_copy_of_changed_memory_entries(
    manager: ThreadedManager, client: WindowClient
) -> None:
    """The event-loop path of a thaw (memory hits checked there) falls through too."""
    chunks = synthetic_chunks(4 * 256, seed=41)
    client.freeze("sealed", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(4 * 256))
    memory = manager.manager.memory
    for chunk in chunks[::2]:
        _flip_in_memory(memory, ("default", chunk.digest))
    with client.thaw("sealed", streams=1) as stream:
        thawed = [c.data for c in stream]
    assert thawed == [c.raw for c in chunks]
    assert memory.corrupt == len(chunks[::2])
    for chunk in chunks:  # every entry holds verified bytes again
        assert memory.read("default", chunk.digest) == chunk.raw


def test_a_reservation_makes_room_at_once_and_counts_until_released() -> None:
    memory = MemoryTier(100)
    for i in range(4):
        memory.write("t", bytes([i]) * 32, bytes(25))
    assert memory.held_bytes == 100
    assert memory.reserve(40) == 40  # a chunk in flight: the two oldest entries go now
    assert memory.held_bytes == 50 and memory.reserved_bytes == 40
    assert memory.contains("t", [bytes([0]) * 32, bytes([1]) * 32]) == set()
    memory.write("t", b"\x09" * 32, bytes(25))  # a write still leaves room for it
    assert memory.held_bytes + memory.reserved_bytes <= 100
    memory.release(40)
    assert memory.reserved_bytes == 0
    assert memory.reserve(101) == 0  # larger than the tier: nothing to hold for it


@pytest.mark.parametrize("transport", ["grpc", "unix"])
def test_a_freeze_s_staging_is_counted_against_the_hot_tier_and_released_after(
    tmp_path: Path, transport: str
) -> None:
    from cwm_server.manager.config import ManagerConfig

    config = ManagerConfig(
        data_dir=tmp_path / "data", listen="127.0.0.1:0", fsync=False, memory_cache_bytes=3 << 20
    )
    running = ThreadedManager(config)
    try:
        memory = running.manager.memory
        peaks: list[int] = []
        reserve = memory.reserve

        def watched(size: int) -> int:
            got = reserve(size)
            peaks.append(memory.held_bytes + memory.reserved_bytes)
            return got

        memory.reserve = watched  # type: ignore[method-assign]
        chunks = synthetic_chunks(256 * 12, seed=8)  # 12 chunks, 3 MiB in all
        with WindowClient(running.target) as client:
            client.freeze(
                "w",
                chunks,
                fingerprint=FINGERPRINT,
                token_ids=token_ids(256 * 12),
                transport=transport,
            )
            bad = synthetic_chunks(256 * 4, seed=9)
            with pytest.raises(DataLoss):  # a chunk that is not its digest's: nothing kept
                client.freeze(
                    "bad",
                    [*bad[:2], _Lying(bad[2]), bad[3]],
                    fingerprint=FINGERPRINT,
                    token_ids=token_ids(256 * 4),
                    transport=transport,
                )
        assert len(peaks) >= 12 and max(peaks) <= 3 << 20
        assert memory.reserved_bytes == 0
    finally:
        running.stop()


class _Lying:
    """A chunk payload whose bytes are not the ones its digest names."""

    def __init__(self, chunk: object) -> None:
        self._chunk = chunk

    def __getattr__(self, name: str) -> object:
        return getattr(self._chunk, name)

    def data(self) -> bytes:
        raw = bytearray(self._chunk.data())  # type: ignore[attr-defined]
        raw[0] ^= 0xFF
        return bytes(raw)
