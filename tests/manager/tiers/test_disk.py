"""The disk tier's O_DIRECT write path: exact file contents and sizes whatever the
alignment, and a clean fall back to buffered writes where the filesystem refuses O_DIRECT."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import Any

import pytest

from cwm_client.chunks import digest as blake3_digest
from cwm_server.manager.tiers.disk import STAGING_BYTES, TMP_SUFFIX, DiskTier
from cwm_server.manager.tiers.format import HEADER_SIZE, StoredChunk, pack_header

SIZES = [
    1,
    4096 - HEADER_SIZE,
    4096 - HEADER_SIZE + 1,
    65536,
    (1 << 20) + 3,
    STAGING_BYTES,
    2 * STAGING_BYTES + 5,
]


def _supports_direct(directory: Path) -> bool:
    probe = directory / "probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    probe.unlink()
    return True


def _write_and_check(tier: DiskTier, size: int) -> None:
    data = os.urandom(size)
    digest = blake3_digest(data)
    stored = tier.write("t", digest, StoredChunk(1, 2, size, data))
    path = tier.path_for("t", digest)
    assert stored == HEADER_SIZE + size == path.stat().st_size
    assert path.read_bytes() == pack_header(1, 2, size) + data
    found = tier.read("t", digest)
    assert found is not None and found.data == data
    assert not list(path.parent.glob(f"*{TMP_SUFFIX}"))


@pytest.mark.parametrize("size", SIZES)
def test_direct_writes_leave_exactly_the_header_and_bytes(tmp_path: Path, size: int) -> None:
    if not _supports_direct(tmp_path):
        pytest.skip(f"{tmp_path} is on a filesystem without O_DIRECT")
    tier = DiskTier(tmp_path)
    _write_and_check(tier, size)
    assert tier.direct  # it stayed on: the file went the O_DIRECT way
    staging = tier._staging.buffer
    assert staging is not None and len(staging) <= STAGING_BYTES  # bounded, whatever the size


def test_open_refusing_o_direct_falls_back_to_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def refusing(path: Any, flags: int, *args: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing)
    tier = DiskTier(tmp_path)
    assert tier.direct
    for size in SIZES:
        _write_and_check(tier, size)
    assert not tier.direct


def test_write_refusing_o_direct_falls_back_to_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _supports_direct(tmp_path):
        pytest.skip(f"{tmp_path} is on a filesystem without O_DIRECT")
    calls = []

    def refusing(*args: Any) -> int:
        calls.append(args)
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "pwrite", refusing)
    tier = DiskTier(tmp_path)
    _write_and_check(tier, 65536)
    assert calls and not tier.direct  # the direct write was tried, refused, then buffered


def test_a_short_write_off_a_block_boundary_goes_on_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a nearly full filesystem with 1 KiB blocks could answer: the rest of the file
    goes buffered (where an O_DIRECT write at that offset would fail with EINVAL)."""
    if not _supports_direct(tmp_path):
        pytest.skip(f"{tmp_path} is on a filesystem without O_DIRECT")
    real_pwrite = os.pwrite
    calls: list[tuple[int, bool]] = []

    def short_once(fd: int, data: Any, offset: int) -> int:
        calls.append((offset, bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)))
        written = real_pwrite(fd, data, offset)
        return min(written, 1024) if len(calls) == 1 else written

    monkeypatch.setattr(os, "pwrite", short_once)
    tier = DiskTier(tmp_path)
    _write_and_check(tier, 65536)
    assert calls[0] == (0, True)
    assert calls[1] == (1024, False)
    assert tier.direct  # the next file is written direct again


def test_nothing_is_written_past_the_end_and_cut_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last partial block is written as it is, not padded to a block and cut back with
    ftruncate (which made ext4 read that block in again at fsync: 4 KiB read per file)."""
    if not _supports_direct(tmp_path):
        pytest.skip(f"{tmp_path} is on a filesystem without O_DIRECT")
    real_pwrite = os.pwrite
    ends: list[int] = []

    def recording(fd: int, data: Any, offset: int) -> int:
        written = real_pwrite(fd, data, offset)
        ends.append(offset + written)
        return written

    def no_truncate(*_: Any) -> None:
        raise AssertionError("ftruncate called")

    monkeypatch.setattr(os, "pwrite", recording)
    monkeypatch.setattr(os, "ftruncate", no_truncate)
    tier = DiskTier(tmp_path)
    for extra in range(16):
        data = os.urandom((256 << 10) + 5 + extra)
        ends.clear()
        tier.write("t", blake3_digest(data), StoredChunk(1, 2, len(data), data))
        total = HEADER_SIZE + len(data)
        assert max(ends) == total  # the file was never longer than its bytes
        assert tier.path_for("t", blake3_digest(data)).read_bytes()[HEADER_SIZE:] == data
    assert tier.direct


def test_other_errors_are_not_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not _supports_direct(tmp_path):
        pytest.skip(f"{tmp_path} is on a filesystem without O_DIRECT")

    def full(*_: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    tier = DiskTier(tmp_path)
    data = os.urandom(1000)
    with pytest.raises(OSError) as caught:
        tier.write("t", blake3_digest(data), StoredChunk(1, 2, len(data), data))
    assert caught.value.errno == errno.ENOSPC
    assert tier.direct
    path = tier.path_for("t", blake3_digest(data))
    assert not path.exists()
    assert not list(path.parent.iterdir())  # no tmp file left behind


def test_without_fsync_writes_are_buffered(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, fsync=False)
    assert not tier.direct
    _write_and_check(tier, 65536)
