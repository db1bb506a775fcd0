"""Memory bound with several streams: a 512 MiB window frozen over 2 streams and thawed over
4 streams, with the reader pausing, keeps a `cwm serve` subprocess within its memory cap +
128 MiB (each stream holds a few chunks; the window's size must not show).

Every freeze stream costs the manager about 10-15 MiB beyond its staged chunks (gRPC's
receive buffers and the copies of the message being parsed), so 4 freeze streams reach
~200 MiB here with a 64 MiB hot tier, past cap + 128 MiB; `auto_streams` never picks more
than the client's CPU count (2 here). See docs/BENCHMARKS.md."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cwm_client import WindowClient
from cwm_server.manager.config import MiB
from tests.e2e.test_memory_bounds import (
    CHUNK_BYTES,
    MEMORY_CAP_MIB,
    SLACK_BYTES,
    RssSampler,
    seeded_token_ids,
    seeded_window,
)
from tests.helpers import FINGERPRINT_1MIB, ManagerProcess

FREEZE_STREAMS = 2
THAW_STREAMS = 4
PAUSE_S = 4.0


@pytest.mark.slow
def test_parallel_freeze_and_paused_parallel_thaw_stay_within_the_memory_cap(
    tmp_path: Path,
) -> None:
    chunk_count = (512 << 20) // CHUNK_BYTES
    chunks = seeded_window(chunk_count, seed=3)
    limit = MEMORY_CAP_MIB * MiB + SLACK_BYTES
    proc = ManagerProcess(
        tmp_path / "data",
        ["--memory-cache-mib", str(MEMORY_CAP_MIB), "--no-fsync", "--log-level", "WARNING"],
    ).start()
    try:
        with WindowClient(proc.target, timeout=300) as client:
            with RssSampler(proc) as freezing:
                result = client.freeze(
                    "big",
                    chunks,
                    fingerprint=FINGERPRINT_1MIB,
                    token_ids=seeded_token_ids(chunk_count),
                    streams=FREEZE_STREAMS,
                )
            assert result.streams == FREEZE_STREAMS and result.chunks_sent == chunk_count
            assert freezing.peak < limit, f"freeze RSS {freezing.peak / MiB:.0f} MiB"
            got = []
            with client.thaw("big", streams=THAW_STREAMS) as stream:
                assert stream.streams == THAW_STREAMS
                thawed = iter(stream)
                got.extend(next(thawed).digest for _ in range(5))
                with RssSampler(proc) as paused:
                    time.sleep(PAUSE_S)
                with RssSampler(proc) as rest:
                    got.extend(chunk.digest for chunk in thawed)
            assert got == [c.digest for c in chunks]
            assert paused.peak < limit, f"paused thaw RSS {paused.peak / MiB:.0f} MiB"
            assert rest.peak < limit, f"thaw RSS {rest.peak / MiB:.0f} MiB"
        print(
            f"\nfreeze peak {freezing.peak / MiB:.0f} MiB, paused {paused.peak / MiB:.0f} MiB, "
            f"thaw {rest.peak / MiB:.0f} MiB, limit {limit / MiB:.0f} MiB"
        )
    finally:
        proc.stop()
