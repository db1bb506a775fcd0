"""The bulk thaw reader on a connection whose peer goes silent or sends what was not asked:
it ends with DATA_LOSS, never hangs, never hands out unverified bytes."""

from __future__ import annotations

import os
import socket
import time

import pytest

from cwm_client import pb
from cwm_client.bulk import shm
from cwm_client.bulk.frames import chunk_head, end_frame
from cwm_client.bulk.thaw_reader import BulkThawReader
from cwm_client.chunks import digest
from cwm_client.errors import DataLoss


def window(data: list[bytes]) -> tuple[pb.WindowInfo, list[pb.ChunkRef]]:
    refs = [
        pb.ChunkRef(index=i, token_start=i, token_count=1, digest=digest(d), raw_size=len(d))
        for i, d in enumerate(data)
    ]
    info = pb.WindowInfo(name="w", chunk_count=len(data), chunks=refs)
    return info, refs


def test_a_silent_peer_ends_the_thaw_with_data_loss() -> None:
    ours, theirs = socket.socketpair()
    ours.settimeout(0.5)  # what connect() sets (IDLE_TIMEOUT_S), shortened
    info, refs = window([b"x" * 100])
    reader = BulkThawReader(ours, info, refs)
    started = time.monotonic()
    with pytest.raises(DataLoss, match="bulk connection"):
        list(reader)
    assert time.monotonic() - started < 5
    reader.close()
    theirs.close()


def test_bytes_that_are_not_the_digest_s_are_refused() -> None:
    ours, theirs = socket.socketpair()
    good = b"a" * 5000
    info, refs = window([good])
    theirs.sendall(chunk_head(0, pb.ChunkCodec.CHUNK_CODEC_RAW, len(good), len(good)))
    theirs.sendall(b"b" * 5000)
    theirs.sendall(end_frame())
    reader = BulkThawReader(ours, info, refs)
    with pytest.raises(DataLoss, match="does not match its digest"):
        list(reader)
    reader.close()
    theirs.close()


def test_a_chunk_out_of_order_or_oversized_is_refused() -> None:
    for head in (
        chunk_head(1, pb.ChunkCodec.CHUNK_CODEC_RAW, 10, 10),  # chunk 1 where 0 is due
        chunk_head(0, pb.ChunkCodec.CHUNK_CODEC_RAW, 10, 1 << 40),  # a huge length
    ):
        ours, theirs = socket.socketpair()
        info, refs = window([b"z" * 10, b"y" * 10])
        theirs.sendall(head)
        reader = BulkThawReader(ours, info, refs)
        with pytest.raises(DataLoss):
            list(reader)
        reader.close()
        theirs.close()


def test_the_chunks_come_out_verified_and_in_order() -> None:
    ours, theirs = socket.socketpair()
    data = [bytes([i]) * (6000 + i) for i in range(3)]
    info, refs = window(data)
    for ref, chunk in zip(refs, data, strict=True):
        theirs.sendall(chunk_head(ref.index, pb.ChunkCodec.CHUNK_CODEC_RAW, len(chunk), len(chunk)))
        theirs.sendall(chunk)
    theirs.sendall(end_frame())
    reader = BulkThawReader(ours, info, refs)
    got = list(reader)
    assert [c.index for c in got] == [0, 1, 2]
    assert [bytes(c.data) for c in got] == data
    reader.close()
    theirs.close()


# -- shared memory ----------------------------------------------------------------------------


def send_file(sock: socket.socket, head: bytes, fd: int) -> None:
    socket.send_fds(sock, [head], [fd])
    os.close(fd)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_shared_memory_chunks_are_mapped_verified_in_place_and_acknowledged() -> None:
    ours, theirs = socket.socketpair()
    data = [bytes([i]) * (70000 + i) for i in range(3)]
    info, refs = window(data)
    for ref, chunk in zip(refs, data, strict=True):
        head = chunk_head(ref.index, pb.ChunkCodec.CHUNK_CODEC_RAW, len(chunk), len(chunk))
        send_file(theirs, head, shm.sealed_file(chunk))
    theirs.sendall(end_frame())
    reader = BulkThawReader(ours, info, refs, shared_memory=True)
    got = list(reader)
    assert [bytes(c.data) for c in got] == data
    assert all(isinstance(c.data, memoryview) and c.data.readonly for c in got)
    assert theirs.recv(16) == shm.ACK * 3
    reader.close()
    theirs.close()


WHY = {
    "unsealed": "not sealed",
    "wrong-size": "holds 8999 bytes, the frame says 9000",
    "no-file": "came without its file",
    "two-files": "2 files came with one frame",
    "a-pipe": "cannot be inspected",
}


@pytest.mark.parametrize("what", ["unsealed", "wrong-size", "no-file", "two-files", "a-pipe"])
def test_a_shared_memory_frame_that_is_not_one_sealed_file_of_its_size_is_refused(
    what: str,
) -> None:
    ours, theirs = socket.socketpair()
    chunk = b"q" * 9000
    info, refs = window([chunk])
    head = chunk_head(0, pb.ChunkCodec.CHUNK_CODEC_RAW, len(chunk), len(chunk))
    before = open_fds()
    if what == "unsealed":  # its sender could change it after it was verified
        fd = os.memfd_create("x")
        os.write(fd, chunk)
        send_file(theirs, head, fd)
    elif what == "wrong-size":
        send_file(theirs, head, shm.sealed_file(chunk[:-1]))
    elif what == "no-file":
        theirs.sendall(head)
    elif what == "two-files":
        socket.send_fds(theirs, [head], [shm.sealed_file(chunk), shm.sealed_file(chunk)])
    else:
        read_end, write_end = os.pipe()
        os.write(write_end, chunk)
        os.close(write_end)
        send_file(theirs, head, read_end)
    reader = BulkThawReader(ours, info, refs, shared_memory=True)
    with pytest.raises(DataLoss, match=WHY[what]):
        list(reader)
    reader.close()
    theirs.close()
    assert open_fds() <= before  # every file that came was closed
