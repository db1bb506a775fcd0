"""`cwm export` / `cwm import`: a window moves between managers as one file, exactly.

Real managers on loopback, the CLI as a subprocess; a tampered archive must be refused
with DATA_LOSS and leave nothing behind in the target manager.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cwm_client import WindowClient, pb
from cwm_client.archive import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_JSON,
    MANIFEST_PB,
    chunk_member_name,
    export_window,
    import_window,
    read_archive,
)
from cwm_client.errors import AlreadyExists, DataLoss, InvalidArgument, NotFound
from cwm_server.manager.config import ManagerConfig
from tests.helpers import (
    FINGERPRINT,
    ROOT,
    ThreadedManager,
    chunk_files,
    env_with_pythonpath,
    synthetic_chunks,
    token_ids,
)

TOKENS = 256 * 3 + 77  # four chunks, the last one short


def cwm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cwm_server.cli.main", *args],
        cwd=ROOT,
        env=env_with_pythonpath(),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def second(tmp_path: Path) -> Iterator[ThreadedManager]:
    """Another manager with its own data dir: the import target."""
    running = ThreadedManager(ManagerConfig(data_dir=tmp_path / "data2", listen="127.0.0.1:0"))
    yield running
    running.stop()


def freeze_sample(client: WindowClient, name: str = "w1") -> list[bytes]:
    chunks = synthetic_chunks(TOKENS, seed=3)
    client.freeze(
        name,
        chunks,
        fingerprint=FINGERPRINT,
        token_ids=token_ids(TOKENS, seed=3),
        session_id="sess-7",
        cache_salt="salt-xyz",
        parent="base-window",
        tags={"team": "a", "stage": "draft"},
        description="a window that travels",
        pinned=True,
        ttl_seconds=3600,
    )
    return [c.raw for c in chunks]


def thaw_all(client: WindowClient, name: str) -> tuple[pb.WindowInfo, list[bytes]]:
    with client.thaw(name) as stream:
        chunks = list(stream)
        return stream.window, [c.data for c in chunks]


def assert_same_window(a: pb.WindowInfo, b: pb.WindowInfo, name: str) -> None:
    assert b.name == name
    assert list(b.token_ids) == list(a.token_ids)
    assert b.token_count == a.token_count
    assert b.fingerprint == a.fingerprint
    assert b.chunk_tokens == a.chunk_tokens
    assert b.chunk_count == a.chunk_count
    assert [(r.index, r.token_start, r.token_count, r.digest, r.raw_size) for r in b.chunks] == [
        (r.index, r.token_start, r.token_count, r.digest, r.raw_size) for r in a.chunks
    ]
    assert b.raw_bytes == a.raw_bytes
    assert dict(b.tags) == dict(a.tags)
    assert b.description == a.description
    assert b.session_id == a.session_id
    assert b.cache_salt == a.cache_salt
    assert b.parent == a.parent
    assert b.pinned == a.pinned
    assert b.HasField("expires_at")
    # the remaining lifetime carries over (to within the seconds the test took)
    assert abs(b.expires_at.seconds - a.expires_at.seconds) <= 30


def test_export_then_import_into_another_manager_is_exact(
    client: WindowClient, manager: ThreadedManager, second: ThreadedManager, tmp_path: Path
) -> None:
    raw = freeze_sample(client)
    original = client.get("w1")
    archive = tmp_path / "w1.cwm.tar"

    out = cwm("export", "w1", str(archive), "--manager", manager.target, "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["name"] == "w1" and summary["file"] == str(archive)
    assert (summary["tokens"], summary["chunks"]) == (TOKENS, 4)
    assert summary["raw_bytes"] == sum(len(r) for r in raw)
    assert summary["bytes_written"] == archive.stat().st_size > summary["raw_bytes"]

    # the layout: manifest.pb first, manifest.json, then one member per chunk in order
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile(MANIFEST_JSON).read())  # type: ignore[union-attr]
    assert names == [MANIFEST_PB, MANIFEST_JSON] + [
        chunk_member_name(r.index, r.digest) for r in original.chunks
    ]
    assert names[2] == f"chunks/000000-{original.chunks[0].digest.hex()}.bin"
    assert (meta["format"], meta["version"]) == (FORMAT, FORMAT_VERSION)
    assert meta["name"] == "w1" and meta["tokens"] == TOKENS

    out = cwm("import", str(archive), "--manager", second.target, "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["name"] == "w1" and summary["chunks"] == 4 and summary["tokens"] == TOKENS
    assert summary["bytes_sent"] == sum(len(r) for r in raw)
    assert summary["raw_bytes"] == sum(len(r) for r in raw)

    with WindowClient(second.target) as target:
        imported, data = thaw_all(target, "w1")
        assert_same_window(original, target.get("w1"), "w1")
    assert_same_window(original, imported, "w1")
    assert data == raw


def test_import_under_a_new_name_sends_only_missing_chunks(
    client: WindowClient, manager: ThreadedManager, tmp_path: Path
) -> None:
    raw = freeze_sample(client)
    original = client.get("w1")
    archive = tmp_path / "w1.tar"
    progress: list[tuple[int, int]] = []
    exported = export_window(client, "w1", archive, progress=lambda d, t: progress.append((d, t)))
    assert exported.chunks == 4 and progress[-1] == (exported.raw_bytes, exported.raw_bytes)

    # every chunk is already here: nothing is read from the archive or sent
    out = cwm("import", str(archive), "--name", "w1-copy", "--manager", manager.target, "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["name"] == "w1-copy" and summary["bytes_sent"] == 0
    assert summary["chunks_sent"] == 0 and summary["chunks_reused"] == 4
    copy, data = thaw_all(client, "w1-copy")
    assert_same_window(original, copy, "w1-copy")
    assert data == raw

    with pytest.raises(AlreadyExists):
        import_window(client, archive, name="w1-copy")
    result = import_window(client, archive, name="w1-copy", replace=True, ttl_seconds=0)
    assert result.name == "w1-copy" and result.chunks_reused == 4
    assert not client.get("w1-copy").HasField("expires_at")

    # export refuses to overwrite unless asked, and a missing window leaves no file
    with pytest.raises(AlreadyExists):
        export_window(client, "w1", archive)
    export_window(client, "w1", archive, overwrite=True)
    with pytest.raises(NotFound):
        export_window(client, "nope", tmp_path / "nope.tar")
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tar") == ["w1.tar"]


def flip_chunk_byte(archive: Path, index: int) -> None:
    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith(f"chunks/{index:06d}-"))
        offset = member.offset_data + member.size // 2
    with open(archive, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))


def wait_for_no_chunk_files(data_dir: Path, timeout: float = 5.0) -> list[Path]:
    """The manager discards a broken stream's chunks asynchronously, just after the call."""
    deadline = time.monotonic() + timeout
    while (left := chunk_files(data_dir)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def test_tampered_archive_is_refused_and_leaves_nothing(
    client: WindowClient, second: ThreadedManager, tmp_path: Path
) -> None:
    freeze_sample(client)
    archive = tmp_path / "w1.tar"
    export_window(client, "w1", archive)
    digests = [r.digest for r in client.get("w1").chunks]
    flip_chunk_byte(archive, 2)  # chunks 0 and 1 are sent before the damage is found

    with WindowClient(second.target) as target:
        with pytest.raises(DataLoss, match=r"chunk 2 \(") as caught:
            import_window(target, archive)
        assert caught.value.metadata == {"chunk_index": "2"}
        assert list(target.list()) == []
        assert target.find_missing(digests) == digests
    assert wait_for_no_chunk_files(second.config.data_dir) == []

    out = cwm("import", str(archive), "--name", "other", "--manager", second.target)
    assert out.returncode == 1
    assert "DATA_LOSS" in out.stderr and "chunk 2 (" in out.stderr
    assert "Traceback" not in out.stderr
    with WindowClient(second.target) as target:
        assert list(target.list()) == []
    assert wait_for_no_chunk_files(second.config.data_dir) == []

    # a full verification pass finds the same chunk without any manager
    with read_archive(archive) as reader, pytest.raises(DataLoss, match="chunk 2 "):
        reader.verify()


def test_damaged_or_foreign_files_are_refused(
    client: WindowClient, manager: ThreadedManager, tmp_path: Path
) -> None:
    freeze_sample(client)
    archive = tmp_path / "w1.tar"
    export_window(client, "w1", archive)

    # token ids are covered by the manifest digest, not only the chunks
    with tarfile.open(archive) as tar:
        member = tar.getmember(MANIFEST_PB)
        offset = member.offset_data + 10
    blob = bytearray(archive.read_bytes())
    blob[offset] ^= 0x01
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(bytes(blob))
    with pytest.raises(DataLoss, match=MANIFEST_PB):
        import_window(client, damaged, name="x")

    foreign = tmp_path / "foreign.tar"
    foreign.write_bytes(b"this is not a tar file at all" * 100)
    with pytest.raises(InvalidArgument, match="not a cwm window archive"):
        import_window(client, foreign, name="x")

    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises((DataLoss, InvalidArgument)):
        import_window(client, truncated, name="x")

    out = cwm("import", str(tmp_path / "missing.tar"), "--manager", manager.target)
    assert out.returncode == 1 and "No such file" in out.stderr
    assert [w.name for w in client.list()] == ["w1"]
