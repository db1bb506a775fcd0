"""Memory bounds of the manager: a 1 GiB window in and out of a `cwm serve` subprocess whose
hot tier is capped, with a thaw reader that stops reading for 10 s half-way.

The manager may hold its memory tier (the cap) plus a few chunks per stream; the size of the
window and the length of the pause must not show in its RSS.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import blake3
import pytest

from cwm_client import WindowClient, pb
from cwm_client.chunks import chunk_raw_size, digest
from cwm_server.manager.config import MiB
from tests.helpers import FINGERPRINT_1MIB, ManagerProcess

CHUNK_TOKENS = 256
CHUNK_BYTES = chunk_raw_size(FINGERPRINT_1MIB, CHUNK_TOKENS)
MEMORY_CAP_MIB = 64
SLACK_BYTES = 128 * MiB
PAUSE_S = 10.0
SAMPLE_EVERY_S = 0.25


def seeded_bytes(seed: int, size: int) -> bytes:
    """Incompressible bytes derived from `seed` (BLAKE3 in XOF mode: ~1 ms per MiB)."""
    return bytes(blake3.blake3(seed.to_bytes(8, "little")).digest(length=size))


@dataclass(frozen=True)
class SeededChunk:
    """A ChunkPayload whose bytes are rebuilt from a seed when sent, so a client can freeze
    a window far larger than it could hold."""

    index: int
    token_start: int
    token_count: int
    digest: bytes
    raw_size: int
    seed: int

    def data(self) -> bytes:
        return seeded_bytes(self.seed, self.raw_size)


def seeded_window(
    chunk_count: int, seed: int = 0, fingerprint: pb.ModelFingerprint = FINGERPRINT_1MIB
) -> list[SeededChunk]:
    """`chunk_count` full chunks of distinct random bytes; each digest computed once."""
    size = chunk_raw_size(fingerprint, CHUNK_TOKENS)
    chunks = []
    for index in range(chunk_count):
        chunk_seed = seed * 1_000_003 + index
        chunks.append(
            SeededChunk(
                index=index,
                token_start=index * CHUNK_TOKENS,
                token_count=CHUNK_TOKENS,
                digest=digest(seeded_bytes(chunk_seed, size)),
                raw_size=size,
                seed=chunk_seed,
            )
        )
    return chunks


def seeded_token_ids(chunk_count: int) -> list[int]:
    return [i % 32000 for i in range(chunk_count * CHUNK_TOKENS)]


class RssSampler:
    """Samples a manager's RSS every `SAMPLE_EVERY_S` in a thread while the block runs."""

    def __init__(self, proc: ManagerProcess) -> None:
        self._proc = proc
        self._stop = threading.Event()
        self.samples: list[int] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._proc.rss_bytes())
            self._stop.wait(SAMPLE_EVERY_S)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.samples.append(self._proc.rss_bytes())

    @property
    def peak(self) -> int:
        return max(self.samples)


def _mib(value: int) -> str:
    return f"{value / MiB:.0f} MiB"


SHARED_SLACK_BYTES = 32 * MiB


def _shared_memory_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Shmem:"):
            return int(line.split()[1]) * 1024
    return 0


def _thaw_with_pause(
    client: WindowClient,
    name: str,
    expected: Sequence[bytes],
    proc: ManagerProcess,
    limit: int,
    transport: str = "auto",
) -> tuple[list[int], list[int]]:
    """Thaw `name`, read 3 chunks, pause (sampling RSS), then read the rest; returns the RSS
    samples of the pause and of the rest."""
    got: list[bytes] = []
    shared_before = _shared_memory_bytes()
    with client.thaw(name, transport=transport) as stream:
        assert stream.transport == ("unix" if transport == "auto" else transport)
        chunks = iter(stream)
        for _ in range(3):
            got.append(next(chunks).digest)
        with RssSampler(proc) as paused:
            time.sleep(PAUSE_S)
        assert paused.peak < limit, (
            f"RSS {_mib(paused.peak)} during a {PAUSE_S:.0f} s pause exceeds {_mib(limit)}"
        )
        # Chunks in shared memory are in no one's RSS until mapped: what the paused thaw
        # holds there (read-ahead, files in flight) is bounded too.
        held = _shared_memory_bytes() - shared_before
        assert held < SHARED_SLACK_BYTES, f"{_mib(held)} of shared memory held by a paused thaw"
        with RssSampler(proc) as rest:
            got.extend(chunk.digest for chunk in chunks)
    assert got == list(expected)
    return paused.samples, rest.samples


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["auto", "shm", "grpc"])
def test_one_gib_freeze_and_paused_thaw_stay_within_the_memory_cap(
    tmp_path: Path, transport: str
) -> None:
    chunk_count = (1 << 30) // CHUNK_BYTES
    chunks = seeded_window(chunk_count, seed=1)
    ids = seeded_token_ids(chunk_count)
    limit = MEMORY_CAP_MIB * MiB + SLACK_BYTES
    proc = ManagerProcess(
        tmp_path / "data",
        ["--memory-cache-mib", str(MEMORY_CAP_MIB), "--no-fsync", "--log-level", "WARNING"],
    ).start()
    try:
        baseline = proc.rss_bytes()
        with WindowClient(proc.target, timeout=300) as client:
            with RssSampler(proc) as freezing:
                started = time.monotonic()
                result = client.freeze(
                    "big", chunks, fingerprint=FINGERPRINT_1MIB, token_ids=ids, transport=transport
                )
                freeze_s = time.monotonic() - started
            assert result.transport == ("unix" if transport == "auto" else transport)
            assert result.window.raw_bytes == 1 << 30
            assert result.chunks_sent == chunk_count
            assert freezing.peak < limit, (
                f"RSS {_mib(freezing.peak)} during a 1 GiB freeze exceeds {_mib(limit)}"
            )

            started = time.monotonic()
            digests = [c.digest for c in chunks]
            paused, rest = _thaw_with_pause(client, "big", digests, proc, limit, transport)
            thaw_s = time.monotonic() - started - PAUSE_S
            assert max(rest) < limit, f"RSS {_mib(max(rest))} after the pause exceeds {_mib(limit)}"
        print(
            f"\nbaseline {_mib(baseline)}; freeze {freeze_s:.1f} s peak {_mib(freezing.peak)}; "
            f"paused peak {_mib(max(paused))}; thaw {thaw_s:.1f} s peak {_mib(max(rest))}; "
            f"VmHWM {_mib(proc.peak_rss_bytes())}; limit {_mib(limit)}"
        )
    finally:
        proc.stop()
