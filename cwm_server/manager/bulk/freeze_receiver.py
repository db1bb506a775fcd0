"""A freeze's staging share arriving on its bulk connection.

Each frame is checked exactly as a Freeze stream's first part of a chunk is
(`header.check_chunk_start`: index order, token span, raw size, codec; the digest comes
from the header, never from the wire), then read whole into one buffer on this transfer's
receiving thread and handed to the same `FreezeStream` staging a gRPC stream uses (its
bounded queue, store workers, BLAKE3 check and durable write). When the queue is full the
coroutine stops asking for frames, the socket's buffers fill and TCP (or the Unix socket)
stops the sender, as HTTP/2 flow control does on gRPC.

On shared memory a frame brings a sealed memfd instead of its bytes: the head is checked
the same way, then the file's bytes are copied into a buffer of the manager's own
(`shm.copy_file`) and acknowledged, so the client never has more than `shm.IN_FLIGHT`
files waiting; a frame without its file, or with more than one, is refused.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
from collections.abc import AsyncIterator

from cwm_client import pb
from cwm_client.buffers import receive_buffer
from cwm_client.bulk import shm
from cwm_client.bulk.frames import (
    HEAD_BYTES,
    BulkProtocolError,
    ChunkHead,
    parse_head,
    recv_exactly,
)
from cwm_client.chunks import AssembledChunk
from cwm_client.errors import InvalidArgument
from cwm_server.manager.windows.header import Spans, check_chunk_start

SLACK_BYTES = 1 << 16


async def bulk_chunks(
    sock: socket.socket,
    header: pb.FreezeHeader,
    spans: Spans,
    max_chunk_bytes: int,
    receiver: concurrent.futures.Executor,
    shared_memory: bool = False,
) -> AsyncIterator[AssembledChunk]:
    """The chunks of `header` that arrive on `sock`, checked, until its end frame. Each is
    read (head, check, bytes) in one hand-off to a receiving thread."""
    last_index = -1
    read = _read_shared_chunk if shared_memory else _read_chunk
    while True:
        chunk = await asyncio.wrap_future(
            receiver.submit(read, sock, header, spans, last_index, max_chunk_bytes)
        )
        if chunk is None:
            return
        last_index = chunk.index
        yield chunk
        del chunk


def _read_chunk(
    sock: socket.socket,
    header: pb.FreezeHeader,
    spans: Spans,
    last_index: int,
    max_chunk_bytes: int,
) -> AssembledChunk | None:
    """The next chunk on `sock`, its head checked before any of its bytes is read; None at
    the end frame."""
    head_bytes = bytearray(HEAD_BYTES)
    recv_exactly(sock, head_bytes)
    head = parse_head(head_bytes)
    if head.is_end:
        return None
    part = _checked(head, header, spans, last_index, max_chunk_bytes)
    data, view = receive_buffer(head.length)
    try:
        recv_exactly(sock, view)
    finally:
        view.release()
    return _assembled(head, part, data)


def _read_shared_chunk(
    sock: socket.socket,
    header: pb.FreezeHeader,
    spans: Spans,
    last_index: int,
    max_chunk_bytes: int,
) -> AssembledChunk | None:
    """As `_read_chunk`, the bytes copied from the file that came with the head."""
    head, fd = shm.receive_frame(sock)
    with shm.closing(fd):
        if head.is_end:
            if fd is not None:
                raise BulkProtocolError("a file came with the end frame")
            return None
        part = _checked(head, header, spans, last_index, max_chunk_bytes)
        if fd is None:
            raise InvalidArgument(f"chunk {head.index} came without its file", field="chunk.data")
        try:
            data = shm.copy_file(fd, head.length)
        except BulkProtocolError as exc:
            raise InvalidArgument(f"chunk {head.index}: {exc}", field="chunk.data") from None
    shm.acknowledge(sock)
    return _assembled(head, part, data)


def _checked(
    head: ChunkHead, header: pb.FreezeHeader, spans: Spans, last_index: int, max_chunk_bytes: int
) -> pb.Chunk:
    """What the head claims, checked as a Freeze stream's first part of a chunk is."""
    part = _claimed(head, header, spans)
    check_chunk_start(part, header, spans, last_index)
    if head.length > min(head.raw_size, max_chunk_bytes) + SLACK_BYTES or head.length == 0:
        raise InvalidArgument(
            f"chunk {head.index}: {head.length} bytes announced for a chunk of "
            f"{head.raw_size} raw bytes",
            field="chunk.data",
        )
    return part


def _assembled(head: ChunkHead, part: pb.Chunk, data: bytes | bytearray) -> AssembledChunk:
    return AssembledChunk(
        index=head.index,
        token_start=part.token_start,
        token_count=part.token_count,
        digest=part.digest,
        codec=head.codec,
        raw_size=head.raw_size,
        data=data,  # type: ignore[arg-type]  # bytes (a bytearray off CPython)
    )


def _claimed(head: ChunkHead, header: pb.FreezeHeader, spans: Spans) -> pb.Chunk:
    """What a frame claims, in the shape `check_chunk_start` checks: the span and the digest
    are the header's (the bulk wire carries neither); an index out of range claims nothing
    else, and the check refuses it."""
    if head.index >= len(spans):
        return pb.Chunk(index=head.index)
    start, count = spans[head.index]
    return pb.Chunk(
        index=head.index,
        token_start=start,
        token_count=count,
        digest=header.chunk_digests[head.index],
        codec=head.codec,  # type: ignore[arg-type]
        raw_size=head.raw_size,
    )
