"""The bulk channel's wire format, the same for every transport (Unix socket, TCP, TLS).

A connection carries one transfer. It opens with the client's hello (`MAGIC` and the
32-byte ticket from the gRPC call's `BulkOffer`); a manager that does not take the ticket
closes the connection without sending a byte. Then chunk frames follow in the direction of
the transfer (manager to client for a thaw, client to manager for a freeze), in the order
the gRPC exchange listed the chunks, and an end frame. A freeze's connection ends with the
manager's result frame: the status of the staging (a `google.rpc.Status` on failure, as
gRPC carries it) and what it stored.

Every chunk frame is a fixed 24-byte head (index, codec, raw size, length of the data that
follows) and the data: no per-part messages, no protobuf, so a receiver reads a chunk
straight into one buffer. The digest is never on the bulk wire: it comes from the gRPC
exchange, and the receiver checks the bytes against it before use.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

MAGIC = b"CWMBULK1"
TICKET_BYTES = 32
HELLO_BYTES = len(MAGIC) + TICKET_BYTES

_HEAD = struct.Struct("<IBxxxQQ")
HEAD_BYTES = _HEAD.size
END_INDEX = 0xFFFFFFFF
"""The index of the end frame (no data follows)."""

_RESULT = struct.Struct("<IIQI")
RESULT_BYTES = _RESULT.size
MAX_RESULT_STATUS = 1 << 20


class BulkProtocolError(Exception):
    """The peer broke the bulk wire format (or went away in the middle of a frame)."""


@dataclass(frozen=True)
class ChunkHead:
    index: int
    codec: int
    raw_size: int
    length: int

    @property
    def is_end(self) -> bool:
        return self.index == END_INDEX


@dataclass(frozen=True)
class BulkResult:
    """A freeze connection's last frame: how the staging went."""

    code: int
    """A grpc.StatusCode value (0: OK)."""
    chunks: int
    encoded_bytes: int
    status: bytes = b""
    """On a failure, the serialized `google.rpc.Status` (message, reason, field, metadata),
    exactly as a failed gRPC call carries it."""


def hello(ticket: bytes) -> bytes:
    return MAGIC + ticket


def chunk_head(index: int, codec: int, raw_size: int, length: int) -> bytes:
    return _HEAD.pack(index, codec, raw_size, length)


def end_frame() -> bytes:
    return _HEAD.pack(END_INDEX, 0, 0, 0)


def parse_head(data: bytes | bytearray | memoryview) -> ChunkHead:
    index, codec, raw_size, length = _HEAD.unpack(data)
    return ChunkHead(index, codec, raw_size, length)


def result_frame(result: BulkResult) -> bytes:
    head = _RESULT.pack(result.code, result.chunks, result.encoded_bytes, len(result.status))
    return head + result.status


def recv_exactly(sock: socket.socket, into: bytearray | memoryview) -> None:
    """Fill `into` from `sock`; BulkProtocolError if the peer closes first."""
    view = memoryview(into).cast("B")
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise BulkProtocolError(f"the connection closed after {got} of {len(view)} bytes")
        got += n


def read_result(sock: socket.socket) -> BulkResult:
    head = bytearray(RESULT_BYTES)
    recv_exactly(sock, head)
    code, chunks, encoded, status_len = _RESULT.unpack(head)
    if status_len > MAX_RESULT_STATUS:
        raise BulkProtocolError(f"a result status of {status_len} bytes")
    status = bytearray(status_len)
    recv_exactly(sock, status)
    return BulkResult(code, chunks, encoded, bytes(status))
