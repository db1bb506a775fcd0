"""The shared-memory transport: each chunk in a sealed memfd passed over the Unix socket.

A frame on an SHM connection is the usual 24-byte head sent with one file descriptor
(SCM_RIGHTS): a memfd holding exactly the chunk's `length` bytes, written once by the
sender with `pwrite` (the kernel copies; the GIL is released) and then sealed against
writing, growing and shrinking. No chunk byte crosses the socket.

- A thaw's receiver maps the file read-only and checks the digest in place: the seals
  make the pages immutable, so what was verified is what the caller reads, and the
  caller's `ThawedChunk.data` is that mapping (a read-only memoryview; the memory goes
  when the last view of it does). A file that is not sealed is refused (DATA_LOSS).
- A freeze's receiver (the manager) copies the file into a buffer of its own with
  `preadv` and verifies that copy: what it stores is its own, whatever the client holds.
  It too takes only sealed memfds (no pipe or file on a slow mount that could stall it).

Every chunk the receiver has taken off the socket is acknowledged with one byte, and a
sender never has more than `IN_FLIGHT` unacknowledged files in the socket: files in
flight belong to neither process, and this bounds them. On a freeze the manager's result
frame follows `RESULT_MARK`, so it is never read as acknowledgements.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import select
import socket
from collections.abc import Iterator, Sequence

from cwm_client import pb
from cwm_client.buffers import receive_buffer
from cwm_client.bulk.frames import HEAD_BYTES, BulkProtocolError, ChunkHead, parse_head

MIN_CHUNK_BYTES = 4 << 20
"""Chunks smaller than this go on the Unix socket when the caller lets the transport be
chosen: a file per chunk costs a fixed few syscalls and page mappings, which outweigh the
copy it saves on small chunks (docs/BENCHMARKS.md: the tiny model's 256 KiB chunks thaw
slower this way, an 8B model's 32 MiB ones faster)."""
IN_FLIGHT = 2
ACK = b"\x01"
RESULT_MARK = b"\x00"
"""On a freeze, what comes before the manager's result frame, so the sender reading its
acknowledgements knows where they end."""
SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
"""What a chunk's file carries before it is passed on (F_SEAL_SEAL: no seal is ever lifted
or added after)."""
REQUIRED_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


def available() -> bool:
    """Whether this host can use the transport (memfd and SCM_RIGHTS: Linux)."""
    return hasattr(os, "memfd_create") and hasattr(socket, "send_fds")


def preferred(wanted: Sequence[int], mean_chunk_bytes: float) -> Sequence[int]:
    """`wanted` without shared memory where its chunks are too small for it to pay and
    another transport is listed (a caller that asked for shared memory alone keeps it)."""
    if len(wanted) > 1 and mean_chunk_bytes < MIN_CHUNK_BYTES:
        return [t for t in wanted if t != pb.BulkTransport.BULK_TRANSPORT_SHM]
    return wanted


def sealed_file(data: bytes | bytearray | memoryview) -> int:
    """A new memfd holding `data`, sealed; the caller closes it."""
    fd = os.memfd_create("cwm-chunk", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data).cast("B")
        written = 0
        while written < len(view):
            written += os.pwrite(fd, view[written:], written)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


class ShmSender:
    """Sends chunk files on one connection, at most `IN_FLIGHT` unacknowledged (used from
    one thread at a time)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._unacked = 0
        self.answered = False
        """The peer sent `RESULT_MARK` (a freeze's manager): its result frame follows."""

    def send(self, head: bytes, data: bytes | bytearray | memoryview) -> None:
        """Send one chunk's file once there is room (nothing, once the peer answered)."""
        while self._unacked >= IN_FLIGHT and not self.answered:
            self._read_ack()
        if self.answered:
            return
        fd = sealed_file(data)
        try:
            socket.send_fds(self._sock, [head], [fd])
        finally:
            os.close(fd)
        self._unacked += 1

    def poll(self) -> bool:
        """Take the acknowledgements that arrived; whether the peer has answered."""
        while not self.answered and select.select([self._sock], [], [], 0)[0]:
            self._read_ack()
        return self.answered

    def wait_answer(self) -> None:
        """Read acknowledgements until the peer's `RESULT_MARK` (its result follows)."""
        while not self.answered:
            self._read_ack()

    def _read_ack(self) -> None:
        # One byte at a time: a result may follow the mark and is not ours to read.
        got = self._sock.recv(1)
        if not got:
            raise BulkProtocolError("the receiver closed the shared-memory connection")
        if got == RESULT_MARK:
            self.answered = True
        else:
            self._unacked = max(0, self._unacked - 1)


def receive_frame(sock: socket.socket) -> tuple[ChunkHead, int | None]:
    """The next head and the file that came with it (None for a frame without one: the end
    frame). The caller owns the file. More than one file, or a file on a short head, is a
    broken stream (every file received is closed)."""
    data, fds, _flags, _addr = socket.recv_fds(sock, HEAD_BYTES, 2)
    if not data:
        _close_all(fds)
        raise BulkProtocolError("the connection closed before the next frame")
    head = bytearray(data)
    while len(head) < HEAD_BYTES:  # a stream socket may split even a small frame
        more, extra, _flags, _addr = socket.recv_fds(sock, HEAD_BYTES - len(head), 1)
        fds += extra
        if not more:
            _close_all(fds)
            raise BulkProtocolError("the connection closed in the middle of a frame head")
        head += more
    if len(fds) > 1:
        _close_all(fds)
        raise BulkProtocolError(f"{len(fds)} files came with one frame")
    return parse_head(head), (fds[0] if fds else None)


def check_file(fd: int, length: int) -> None:
    """BulkProtocolError unless `fd` is a sealed memfd of exactly `length` bytes (only
    shared memory carries seals: no pipe, socket, device or file on a slow mount can stand
    in for one)."""
    try:
        size = os.fstat(fd).st_size
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise BulkProtocolError(f"the chunk's file cannot be inspected ({exc})") from None
    if size != length:
        raise BulkProtocolError(f"the chunk's file holds {size} bytes, the frame says {length}")
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        raise BulkProtocolError("the chunk's file is not sealed against writing")


def map_sealed(fd: int, length: int) -> memoryview:
    """A read-only view of a sealed chunk file (checked first); the file can be closed
    after, the mapping lives as long as the view."""
    check_file(fd, length)
    if length == 0:
        return memoryview(b"")
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return memoryview(mmap.mmap(fd, length, flags, mmap.PROT_READ))


def copy_file(fd: int, length: int) -> bytes | bytearray:
    """The chunk file's bytes in a buffer of the receiver's own (checked first)."""
    check_file(fd, length)
    data, view = receive_buffer(length)
    try:
        got = 0
        while got < length:
            n = os.preadv(fd, [view[got:]], got)
            if n == 0:
                raise BulkProtocolError(f"the chunk's file ended after {got} of {length} bytes")
            got += n
    finally:
        view.release()
    return data


@contextlib.contextmanager
def closing(fd: int | None) -> Iterator[None]:
    """Close the frame's file (if it brought one) however the block ends."""
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def acknowledge(sock: socket.socket) -> None:
    """Tell the sender one more file was taken. A sender that has sent its last file no
    longer reads them and may have closed: what is left to read says how it ended."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(ACK)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
