"""A chunk file found corrupt heals: it is quarantined on the read that finds it, listed as
missing, and the next import (or freeze) of the same bytes repairs every window that
shares it; an archive is verified whole even where the manager holds its chunks."""

from __future__ import annotations

from pathlib import Path

import pytest

from cwm_client import WindowClient
from cwm_client.archive import export_window, import_window
from cwm_client.errors import DataLoss
from cwm_server.manager.config import ManagerConfig
from tests.helpers import FINGERPRINT, ThreadedManager, synthetic_chunks, token_ids

TOKENS = 256 * 3


def start(data_dir: Path) -> ThreadedManager:
    # No hot tier: every thaw reads the disk's copy.
    config = ManagerConfig(
        data_dir=data_dir, listen="127.0.0.1:0", fsync=False, memory_cache_bytes=0
    )
    return ThreadedManager(config)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def thaw_all(client: WindowClient, name: str) -> list[bytes]:
    with client.thaw(name, transport="grpc", streams=1) as stream:
        return [bytes(c.data) for c in stream]


def corrupt_counted(running: ThreadedManager) -> float:
    value = running.server.metrics.registry.get_sample_value(
        "cwm_chunks_corrupt_total", {"tier": "disk"}
    )
    return value or 0.0


def test_a_corrupt_chunk_is_quarantined_and_an_import_of_a_backup_heals_every_window(
    tmp_path: Path,
) -> None:
    chunks = synthetic_chunks(TOKENS, seed=51)
    running = start(tmp_path / "data")
    try:
        with WindowClient(running.target) as client:
            client.freeze("w", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(TOKENS))
            client.clone("w", "branch")  # shares every chunk
            backup = tmp_path / "w.cwm"
            export_window(client, "w", backup)
            bad = chunks[1].digest
            chunk_file = running.manager.disk.path_for("default", bad)
            flip_a_byte(chunk_file)

            with pytest.raises(DataLoss) as caught:
                thaw_all(client, "w")
            assert caught.value.reason == "CHUNK_CORRUPT"
            assert "quarantined" in caught.value.message
            assert not chunk_file.exists()
            assert (tmp_path / "data" / "quarantine" / "default" / bad.hex()).exists()
            assert corrupt_counted(running) == 1
            assert client.find_missing([c.digest for c in chunks]) == [bad]

            healed = import_window(client, backup, replace=True)
            assert healed.chunks_sent == 1  # only the quarantined chunk
            expected = [c.data() for c in chunks]
            assert thaw_all(client, "w") == expected
            assert thaw_all(client, "branch") == expected  # the clone healed too
            assert client.find_missing([c.digest for c in chunks]) == []
            assert not (tmp_path / "data" / "quarantine" / "default" / bad.hex()).exists()
    finally:
        running.stop()


def test_the_quarantine_outlives_a_restart(tmp_path: Path) -> None:
    chunks = synthetic_chunks(TOKENS, seed=52)
    running = start(tmp_path / "data")
    try:
        with WindowClient(running.target) as client:
            client.freeze("w", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(TOKENS))
            flip_a_byte(running.manager.disk.path_for("default", chunks[0].digest))
            with pytest.raises(DataLoss):
                thaw_all(client, "w")
    finally:
        running.stop()
    running = start(tmp_path / "data")
    try:
        with WindowClient(running.target) as client:
            assert client.find_missing([c.digest for c in chunks]) == [chunks[0].digest]
            client.freeze(  # a freeze of the same bytes heals it as an import does
                "again", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(TOKENS)
            )
            assert thaw_all(client, "w") == [c.data() for c in chunks]
    finally:
        running.stop()


def test_an_archive_is_verified_whole_even_where_the_manager_holds_its_chunks(
    tmp_path: Path,
) -> None:
    chunks = synthetic_chunks(TOKENS, seed=53)
    running = start(tmp_path / "data")
    try:
        with WindowClient(running.target) as client:
            client.freeze("w", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(TOKENS))
            backup = tmp_path / "w.cwm"
            export_window(client, "w", backup)
            raw = bytearray(backup.read_bytes())
            at = raw.find(chunks[2].data()[:64])
            assert at > 0
            raw[at + 10] ^= 0x01  # damage chunk 2's bytes inside the archive
            backup.write_bytes(bytes(raw))
            with pytest.raises(DataLoss) as caught:
                import_window(client, backup, name="copy")
            assert "chunk 2" in caught.value.message
            assert [w.name for w in client.list()] == ["w"]
    finally:
        running.stop()


def test_fsck_repair_quarantines_a_corrupt_file_and_the_manager_then_asks_for_it(
    tmp_path: Path,
) -> None:
    from cwm_server.fsck import run_fsck

    chunks = synthetic_chunks(TOKENS, seed=54)
    running = start(tmp_path / "data")
    try:
        with WindowClient(running.target) as client:
            client.freeze("w", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(TOKENS))
            export_window(client, "w", tmp_path / "w.cwm")
        chunk_file = running.manager.disk.path_for("default", chunks[2].digest)
    finally:
        running.stop()
    flip_a_byte(chunk_file)

    checked = run_fsck(tmp_path / "data")
    assert len(checked.problems) == 1 and checked.problems[0].repairable
    assert chunk_file.exists()  # without --repair nothing moves
    repaired = run_fsck(tmp_path / "data", repair=True)
    assert len(repaired.problems) == 1 and not repaired.problems[0].repaired
    assert "quarantined" in repaired.problems[0].message and not chunk_file.exists()
    assert (tmp_path / "data" / "quarantine" / "default" / chunks[2].digest.hex()).exists()

    running = start(tmp_path / "data")
    try:
        with WindowClient(running.target) as client:
            assert client.find_missing([c.digest for c in chunks]) == [chunks[2].digest]
            assert import_window(client, tmp_path / "w.cwm", replace=True).chunks_sent == 1
            assert thaw_all(client, "w") == [c.data() for c in chunks]
    finally:
        running.stop()
    assert run_fsck(tmp_path / "data").clean


def test_the_scrubber_finds_and_quarantines_a_corrupt_file_no_read_asked_for(
    tmp_path: Path,
) -> None:
    from tests.helpers import eventually

    chunks = synthetic_chunks(TOKENS, seed=55)
    config = ManagerConfig(
        data_dir=tmp_path / "data",
        listen="127.0.0.1:0",
        fsync=False,
        scrub_interval_s=0.2,
        scrub_mib_per_s=1024,
    )
    running = ThreadedManager(config)
    try:
        with WindowClient(running.target) as client:
            client.freeze("w", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(TOKENS))
            flip_a_byte(running.manager.disk.path_for("default", chunks[0].digest))
            digests = [c.digest for c in chunks]
            assert eventually(lambda: client.find_missing(digests) == [chunks[0].digest])
            assert running.server.scrubber.found_corrupt == 1
            assert running.server.scrubber.passes >= 1
    finally:
        running.stop()
