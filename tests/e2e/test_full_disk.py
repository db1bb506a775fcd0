"""A data dir on a disk that something else filled: a freeze is RESOURCE_EXHAUSTED
(DISK_FULL) and leaves nothing, a delete still works (the manager's space reserve), and once
space is freed a freeze works again with fsck clean. The disk is a small tmpfs this test
mounts (root only; skipped elsewhere)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cwm_client import WindowClient
from cwm_client.errors import ResourceExhausted
from cwm_server.fsck import run_fsck
from cwm_server.manager.config import ManagerConfig, ServerOptions
from tests.helpers import (
    FINGERPRINT,
    ThreadedManager,
    fill_disk,
    mounted_tmpfs,
    synthetic_chunks,
    token_ids,
)

DISK_MIB = 64
TOKENS = 256 * 8  # 8 chunks of 256 KiB: 2 MiB a window


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "disk", DISK_MIB) as mount:
        yield mount


def test_a_full_disk_refuses_freezes_with_disk_full_lets_deletes_through_and_recovers(
    small_disk: Path,
) -> None:
    data = small_disk / "data"
    config = ManagerConfig(
        data_dir=data, listen="127.0.0.1:0", fsync=True, memory_cache_bytes=1 << 20
    )
    running = ThreadedManager(config, ServerOptions(min_free_bytes=0))
    try:
        with WindowClient(running.target) as client:
            for name, seed in (("a", 1), ("b", 2)):
                client.freeze(
                    name,
                    synthetic_chunks(TOKENS, seed=seed),
                    fingerprint=FINGERPRINT,
                    token_ids=token_ids(TOKENS),
                )
            filler = small_disk / "filler"
            fill_disk(filler)
            with pytest.raises(ResourceExhausted) as full:
                client.freeze(
                    "c",
                    synthetic_chunks(TOKENS, seed=3),
                    fingerprint=FINGERPRINT,
                    token_ids=token_ids(TOKENS),
                )
            assert full.value.reason == "DISK_FULL", full.value
            with pytest.raises(ResourceExhausted) as full:  # only the catalog has to grow
                client.freeze(
                    "b2",
                    synthetic_chunks(TOKENS, seed=2),
                    fingerprint=FINGERPRINT,
                    token_ids=token_ids(TOKENS),
                    description="x" * 4000,
                )
            assert full.value.reason == "DISK_FULL", full.value
            assert sorted(w.name for w in client.list()) == ["a", "b"]

            client.delete("a")  # on the full disk
            assert [w.name for w in client.list()] == ["b"]

            filler.unlink()
            client.freeze(
                "c",
                synthetic_chunks(TOKENS, seed=3),
                fingerprint=FINGERPRINT,
                token_ids=token_ids(TOKENS),
            )
            with client.thaw("c", transport="grpc", streams=1) as stream:
                assert [bytes(x.data) for x in stream] == [
                    x.data() for x in synthetic_chunks(TOKENS, seed=3)
                ]
            assert sorted(w.name for w in client.list()) == ["b", "c"]
            assert running.manager.space_reserve.held  # taken back once space came back
    finally:
        running.stop()
    report = run_fsck(data)
    assert report.clean, [p.message for p in report.problems]
