"""Killing either side in the middle of a bulk transfer: the other side ends with a typed
error, and no window appears (a restarted manager finds nothing half-done)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest

from cwm_client import WindowClient
from cwm_client.errors import Unavailable
from tests.helpers import (
    FINGERPRINT_1MIB,
    ManagerProcess,
    chunk_files,
    eventually,
    synthetic_chunks,
    token_ids,
)

TOKENS = 256 * 96  # 96 chunks of 1 MiB


@pytest.mark.parametrize("transport", ["shm", "unix", "tcp"])
def test_a_manager_killed_mid_bulk_freeze_leaves_no_window(tmp_path: Path, transport: str) -> None:
    chunks = synthetic_chunks(TOKENS, FINGERPRINT_1MIB, seed=3)
    proc = ManagerProcess(tmp_path / "data", ["--no-fsync", "--log-level", "WARNING"]).start()
    killed = threading.Event()

    def kill_at_a_third(done: int, total: int) -> None:
        if done > total // 3 and not killed.is_set():
            killed.set()
            proc.kill(signal.SIGKILL)

    try:
        with WindowClient(proc.target, timeout=30) as client, pytest.raises(Unavailable):
            client.freeze(
                "cut",
                chunks,
                fingerprint=FINGERPRINT_1MIB,
                token_ids=token_ids(TOKENS),
                transport=transport,
                progress=kill_at_a_third,
            )
        assert killed.is_set()
        proc.start()
        with WindowClient(proc.target, timeout=30) as client:
            assert [w.name for w in client.list()] == []
        assert chunk_files(tmp_path / "data") == []  # start-up recovery removed the orphans
    finally:
        proc.stop()


@pytest.mark.parametrize("transport", ["shm", "unix", "tcp"])
def test_a_manager_killed_mid_bulk_thaw_ends_the_thaw_with_unavailable(
    tmp_path: Path, transport: str
) -> None:
    chunks = synthetic_chunks(TOKENS, FINGERPRINT_1MIB, seed=4)
    proc = ManagerProcess(tmp_path / "data", ["--no-fsync", "--log-level", "WARNING"]).start()
    try:
        with WindowClient(proc.target, timeout=30) as client:
            client.freeze("w", chunks, fingerprint=FINGERPRINT_1MIB, token_ids=token_ids(TOKENS))
            with client.thaw("w", transport=transport) as stream:
                assert stream.transport == transport
                received = iter(stream)
                first = next(received)
                assert bytes(first.data) == chunks[0].data()
                proc.kill(signal.SIGKILL)
                with pytest.raises(Unavailable):
                    for _ in received:
                        pass
    finally:
        proc.stop()


def test_a_client_gone_mid_bulk_thaw_frees_the_manager_s_streams(tmp_path: Path) -> None:
    chunks = synthetic_chunks(TOKENS, FINGERPRINT_1MIB, seed=5)
    proc = ManagerProcess(tmp_path / "data", ["--no-fsync", "--log-level", "WARNING"]).start()
    try:
        with WindowClient(proc.target, timeout=30) as client:
            client.freeze("w", chunks, fingerprint=FINGERPRINT_1MIB, token_ids=token_ids(TOKENS))
            for _ in range(5):  # abandoned thaws: each closes after two chunks
                with client.thaw("w") as stream:
                    received = iter(stream)
                    next(received)
                    next(received)
            client.delete("w")  # pins released: the files go
        with WindowClient(proc.target, timeout=30) as client:
            assert [w.name for w in client.list()] == []
        assert eventually(lambda: chunk_files(tmp_path / "data") == [], timeout=20)
    finally:
        proc.stop()
