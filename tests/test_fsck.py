"""`cwm fsck` against real data dirs: clean, a flipped byte, orphans, temp files, bad refcounts.

The manager runs as a subprocess (`ManagerProcess`) and is stopped before the store is
damaged, the way an operator would find it after a disk fault or a crash.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from cwm_client import WindowClient, pb
from cwm_client.archive import export_window
from cwm_client.errors import DataLoss
from cwm_server.fsck import run_fsck
from cwm_server.manager.tiers.format import HEADER_SIZE
from tests.helpers import (
    FINGERPRINT,
    ROOT,
    ManagerProcess,
    ThreadedManager,
    env_with_pythonpath,
    synthetic_chunks,
    token_ids,
)


def fsck(data_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cwm_server.cli.main", "fsck", "--data-dir", str(data_dir), *extra],
        cwd=ROOT,
        env=env_with_pythonpath(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def fsck_json(data_dir: Path, *extra: str) -> tuple[int, dict[str, object]]:
    out = fsck(data_dir, "--json", *extra)
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, json.loads(out.stdout)


def kinds(report: dict[str, object]) -> list[str]:
    problems = report["problems"]
    assert isinstance(problems, list)
    return sorted(p["kind"] for p in problems)


@dataclass
class Store:
    data_dir: Path
    w1: pb.WindowInfo
    w2: pb.WindowInfo

    def chunk_path(self, digest: bytes) -> Path:
        hexd = digest.hex()
        return self.data_dir / "chunks" / "default" / hexd[:2] / hexd


def freeze(client: WindowClient, name: str, tokens: int, seed: int) -> None:
    client.freeze(
        name,
        synthetic_chunks(tokens, seed=seed),
        fingerprint=FINGERPRINT,
        token_ids=token_ids(tokens, seed=seed),
    )


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """A stopped manager's data dir: w1 (3 chunks), its clone w1-branch, and w2 (1 chunk)."""
    data_dir = tmp_path / "data"
    proc = ManagerProcess(data_dir, ["--no-fsync"]).start()
    try:
        with WindowClient(proc.target) as client:
            freeze(client, "w1", 256 * 2 + 50, seed=1)
            client.clone("w1", "w1-branch")
            freeze(client, "w2", 200, seed=2)
            w1, w2 = client.get("w1"), client.get("w2")
    finally:
        proc.stop()
    return Store(data_dir, w1, w2)


def restart(data_dir: Path) -> ManagerProcess:
    return ManagerProcess(data_dir, ["--no-fsync"]).start()


def test_clean_store_passes_even_while_the_manager_runs(
    manager: ThreadedManager, client: WindowClient
) -> None:
    freeze(client, "a", 256 * 2, seed=1)
    client.clone("a", "b")
    freeze(client, "c", 100, seed=2)
    data_dir = manager.config.data_dir

    out = fsck(data_dir)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "clean: 3 windows, 3 chunk rows, 3 chunk files, 3 chunks verified" in out.stdout

    code, report = fsck_json(data_dir)
    assert code == 0 and report["clean"] is True and report["problems"] == []
    assert report["manager_running"] is True

    # repairing under a live manager could delete a freeze's uncommitted chunks: refused
    out = fsck(data_dir, "--repair")
    assert out.returncode == 2 and "stop it" in out.stderr
    # a chunk file without a row may be a freeze in flight: not an orphan while it runs
    in_flight = data_dir / "chunks" / "default" / "ab" / ("ab" * 32)
    in_flight.parent.mkdir(parents=True, exist_ok=True)
    in_flight.write_bytes(b"being written")
    code, report = fsck_json(data_dir)
    assert code == 0 and report["in_flight_skipped"] == 1
    in_flight.unlink()
    # and the manager keeps working after being checked
    assert [w.name for w in client.list()] == ["a", "b", "c"]


def test_flipped_byte_names_every_window_and_chunk_index(store: Store) -> None:
    target = store.w1.chunks[1]
    path = store.chunk_path(target.digest)
    blob = bytearray(path.read_bytes())
    blob[HEADER_SIZE + 1000] ^= 0x40
    path.write_bytes(bytes(blob))

    out = fsck(store.data_dir)
    assert out.returncode == 1, out.stdout + out.stderr
    short = target.digest.hex()[:12]
    assert f"window 'w1' chunk 1 ({short}…): corrupt (digest mismatch)" in out.stdout
    assert f"window 'w1-branch' chunk 1 ({short}…): corrupt (digest mismatch)" in out.stdout
    assert "unrecoverable windows" in out.stdout and "w1 (chunks 1)" in out.stdout
    assert "'w2'" not in out.stdout

    code, report = fsck_json(store.data_dir)
    assert code == 1 and kinds(report) == ["corrupt", "corrupt"]
    assert report["unrecoverable_windows"] == [
        {"window": "default/w1", "chunks": [1]},
        {"window": "default/w1-branch", "chunks": [1]},
    ]

    # repair leaves the damaged windows for a person to decide about
    out = fsck(store.data_dir, "--repair")
    assert out.returncode == 1 and "corrupt (digest mismatch)" in out.stdout
    proc = restart(store.data_dir)
    try:
        with WindowClient(proc.target) as client:
            assert [w.name for w in client.list()] == ["w1", "w1-branch", "w2"]
            with pytest.raises(DataLoss), client.thaw("w1") as stream:
                list(stream)
            # nor can it be exported: the archive is never half-written
            with pytest.raises(DataLoss, match="chunk 1"):
                export_window(client, "w1", store.data_dir.parent / "w1.tar")
            assert not list(store.data_dir.parent.glob("*w1.tar*"))
    finally:
        proc.stop()


def test_missing_file_is_reported(store: Store) -> None:
    store.chunk_path(store.w2.chunks[0].digest).unlink()
    out = fsck(store.data_dir)
    assert out.returncode == 1
    assert f"window 'w2' chunk 0 ({store.w2.chunks[0].digest.hex()[:12]}…): missing" in out.stdout


def test_orphan_and_temp_files_are_reported_and_repaired(store: Store) -> None:
    orphan = store.data_dir / "chunks" / "default" / "ab" / ("ab" + "cd" * 31)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"left by a freeze that never committed")
    some_file = store.chunk_path(store.w2.chunks[0].digest)
    temp = some_file.with_name(f"{some_file.name}.4242.7f00.tmp")
    temp.write_bytes(b"half a chunk")
    stray = store.data_dir / "chunks" / "default" / "notes.txt"
    stray.write_text("not ours to delete")

    code, report = fsck_json(store.data_dir)
    assert code == 1 and kinds(report) == ["orphan_file", "temp_file"]
    assert all(p["repairable"] and not p["repaired"] for p in report["problems"])  # type: ignore[union-attr]
    out = fsck(store.data_dir)
    assert f"orphan chunk file chunks/default/ab/{orphan.name}" in out.stdout

    code, report = fsck_json(store.data_dir, "--repair")
    assert code == 1 and report["repaired_count"] == 2
    assert not orphan.exists() and not temp.exists()
    assert some_file.exists()
    code, report = fsck_json(store.data_dir)
    assert code == 0 and report["problems"] == []
    assert [w["kind"] for w in report["warnings"]] == ["stray_file"]  # type: ignore[union-attr]
    assert stray.exists()


def test_refcounts_and_missing_rows_are_repaired(store: Store) -> None:
    shared = store.w1.chunks[0].digest
    lost_row = store.w2.chunks[0].digest
    with sqlite3.connect(store.data_dir / "catalog.sqlite") as db:
        db.execute("UPDATE chunks SET refcount = 7 WHERE digest = ?", (shared,))
        db.execute("DELETE FROM chunks WHERE digest = ?", (lost_row,))
        db.execute("INSERT INTO chunks VALUES ('default', ?, 1, 10, 26, 1)", (b"\x01" * 32,))
    db.close()

    report = run_fsck(store.data_dir)
    assert sorted(p.kind for p in report.problems) == [
        "missing_row",
        "refcount",
        "unreferenced_row",
    ]
    refcount = next(p for p in report.problems if p.kind == "refcount")
    assert "refcount 7, but windows hold 2 references" in refcount.message

    repaired = run_fsck(store.data_dir, repair=True)
    assert repaired.repaired == 3 and repaired.remaining == 0
    assert run_fsck(store.data_dir).clean

    # the re-created row keeps w2's chunk through a restart (whose recovery deletes files
    # without a row), and the fixed refcounts let deletes collect exactly what they should
    proc = restart(store.data_dir)
    try:
        with WindowClient(proc.target) as client:
            with client.thaw("w2") as stream:
                assert [c.digest for c in stream] == [lost_row]
            client.delete("w1")
            assert client.find_missing([shared]) == []
            client.delete("w1-branch")
            assert client.find_missing([shared]) == [shared]
    finally:
        proc.stop()
    assert run_fsck(store.data_dir).clean


def test_a_corrupt_keyed_value_is_reported_by_key_without_nul(tmp_path: Path) -> None:
    """A chunk used by a key (KeyedChunkService) and a window: the key is named in its own
    `key` field and in `unrecoverable_keys`, never as a window (and never with a NUL)."""
    from cwm_client import KeyedChunkClient, KeyedValue

    data_dir = tmp_path / "data"
    value = KeyedValue("model@1@0@00ff@bfloat16", synthetic_chunks(256, seed=4)[0].raw, word_size=2)
    proc = ManagerProcess(data_dir, ["--no-fsync"]).start()
    try:
        with KeyedChunkClient(proc.target) as keyed:
            keyed.put([value, KeyedValue("intact", b"fine" * 100)])
            keyed.promote(
                "promoted",
                [value.key],
                fingerprint=FINGERPRINT,
                token_ids=token_ids(256, seed=4),
                chunk_tokens=256,
            )
    finally:
        proc.stop()
    hexd = value.with_digest().digest.hex()
    path = data_dir / "chunks" / "default" / hexd[:2] / hexd
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 0x40
    path.write_bytes(bytes(blob))

    out = fsck(data_dir, "--json")
    assert out.returncode == 1, out.stderr
    assert "\\u0000" not in out.stdout and "\x00" not in out.stdout
    report = json.loads(out.stdout)
    assert kinds(report) == ["corrupt", "corrupt"]
    by_user = {(p["window"], p["key"]): p for p in report["problems"]}
    assert set(by_user) == {("promoted", ""), ("", value.key)}
    assert by_user[("", value.key)]["chunk_index"] is None
    assert by_user[("", value.key)]["message"].startswith(f"key {value.key!r} (")
    assert by_user[("promoted", "")]["chunk_index"] == 0
    assert report["unrecoverable_windows"] == [{"window": "default/promoted", "chunks": [0]}]
    assert report["unrecoverable_keys"] == [{"tenant": "default", "key": value.key}]

    text = fsck(data_dir).stdout
    assert "\x00" not in text
    assert f"unrecoverable keys (missing or corrupt values; left in place): {value.key!r}" in text
    assert "unrecoverable windows (missing or corrupt chunks; left in place): promoted" in text
