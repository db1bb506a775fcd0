"""A thaw's chunks (or a keyed get's values) on its bulk connection.

The gRPC call's coroutine keeps driving the transfer: it takes the chunks from the
transfer's bounded read-ahead (a thaw stream's, or a keyed get's) and hands each to one
sending thread of this transfer, which writes the frame head and the bytes with blocking
`sendall` (no copy into an asyncio buffer; the GIL is released while the kernel copies). At
most `IN_FLIGHT` chunks wait for that thread, and the read-ahead shrinks by as many, so the
manager holds no more chunks of one thaw than `stream_window_chunks` however slowly the
client reads. If the call ends (cancelled, or a chunk fails its check) the connection is
closed at once, so the client sees the end and reads the reason from the gRPC status.

On shared memory the thread writes each chunk into a sealed memfd of its own instead and
passes the file (`cwm_client.bulk.shm`): the pages are never mapped into the manager, and
it waits for the client's acknowledgements so that at most `shm.IN_FLIGHT` files are
unread in the socket.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable

from cwm_client import pb
from cwm_client.bulk.frames import chunk_head, end_frame
from cwm_client.bulk.shm import ShmSender

IN_FLIGHT = 2
SHM_SEND_BUFFER_BYTES = 4096


Fetched = Callable[[int], AsyncIterator[tuple[pb.ChunkRef, int, bytes | memoryview]]]
"""A transfer's chunks in order (ref, codec, bytes), at most the given number in hand or
being read at once (`windows.thaw.ThawStream.fetched`, `keyed.chunks.KeyedRead.fetched`)."""


async def send_chunks(
    fetched: Fetched, sock: socket.socket, window_chunks: int, shared_memory: bool = False
) -> int:
    """Send every chunk `fetched` gives on `sock` (each in a file of its own with
    `shared_memory`), then the end frame; returns the bytes sent."""
    sender = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cwm-bulk-send")
    send = functools.partial(_send, sock)
    if shared_memory:
        # The kernel's own bound on files unread in the socket, whatever the client
        # acknowledges: a frame is a few dozen bytes, the buffer holds a handful.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SHM_SEND_BUFFER_BYTES)
        send = ShmSender(sock).send
    in_flight: deque[concurrent.futures.Future[None]] = deque()
    sent = 0
    try:
        read_ahead = max(1, window_chunks - IN_FLIGHT)
        async for ref, codec, data in fetched(read_ahead):
            while len(in_flight) >= IN_FLIGHT:
                await asyncio.wrap_future(in_flight.popleft())
            head = chunk_head(ref.index, codec, ref.raw_size, len(data))
            in_flight.append(sender.submit(send, head, data))
            sent += len(data)
            del data
        while in_flight:
            await asyncio.wrap_future(in_flight.popleft())
        await asyncio.wrap_future(sender.submit(sock.sendall, end_frame()))
        return sent
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # unblocks a send still running
        sock.close()
        for pending in in_flight:
            pending.cancel()
        sender.shutdown(wait=False)


def _send(sock: socket.socket, head: bytes, data: bytes | memoryview) -> None:
    sock.sendall(head)
    sock.sendall(data)
