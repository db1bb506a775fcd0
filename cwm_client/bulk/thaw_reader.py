"""Reading a thaw's chunks from its bulk connection.

One thread receives frames straight into a fresh buffer per chunk (no parts, no protobuf)
and queues at most `read_ahead` of them; the consumer's thread checks each against the
digest the gRPC stream listed, so receiving chunk k+1 overlaps verifying chunk k (both
release the GIL). Nothing is used before its digest matches.

On shared memory each frame brings a sealed file instead of bytes: the receiving thread
maps it read-only, acknowledges it, and the chunk's data is that mapping, verified in
place (`cwm_client.bulk.shm`): no byte is copied on this side.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
from collections.abc import Iterator, Sequence

from cwm_client import pb
from cwm_client.buffers import BufferPool
from cwm_client.bulk import shm
from cwm_client.bulk.frames import (
    HEAD_BYTES,
    BulkProtocolError,
    ChunkHead,
    parse_head,
    recv_exactly,
)
from cwm_client.chunks import DTYPE_SIZE
from cwm_client.errors import DataLoss
from cwm_client.queues import put_unless_closed, take_unless_closed
from cwm_client.thawed import ThawedChunk, verified_chunk

_END = object()
SLACK_BYTES = 1 << 16
"""How much larger than its raw size an encoded chunk may be on the wire (never, in
practice: a codec is used only where it saves); anything beyond is a broken stream."""


class BulkThawReader:
    """The chunks `refs` (in this order) from `sock`, verified."""

    def __init__(
        self,
        sock: socket.socket,
        window: pb.WindowInfo,
        refs: Sequence[pb.ChunkRef],
        read_ahead: int = 4,
        shared_memory: bool = False,
    ) -> None:
        self._sock = sock
        self._shared_memory = shared_memory
        self._window = window
        self._refs = list(refs)
        self._word = DTYPE_SIZE.get(window.fingerprint.kv_dtype, 1)
        self._queue: queue.Queue[object] = queue.Queue(max(1, read_ahead))
        self._stop = threading.Event()
        self._pool = BufferPool(keep=read_ahead + 4)
        """Chunk buffers reused once the caller dropped them (no fresh pages per chunk)."""
        self.encoded_bytes = 0
        self.received = 0
        self._thread = threading.Thread(target=self._receive, name="cwm-bulk-thaw", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[ThawedChunk]:
        for ref in self._refs:
            item = self._take()
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, tuple)
            codec, data = item
            chunk = verified_chunk(
                self._window.name,
                ref.index,
                ref.token_start,
                ref.token_count,
                ref.digest,
                codec,
                data,
                ref.raw_size,
                self._word,
            )
            self.received += 1
            yield chunk
        item = self._take()
        if isinstance(item, BaseException):
            raise item
        if item is not _END:
            raise DataLoss("the bulk connection sent more chunks than were asked for")

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _receive(self) -> None:
        try:
            for ref in self._refs:
                frame, fd = self._frame()
                with shm.closing(fd):
                    if frame.is_end or frame.index != ref.index:
                        raise DataLoss(
                            f"the bulk connection sent chunk {frame.index} where chunk "
                            f"{ref.index} was due"
                        )
                    if frame.raw_size != ref.raw_size or frame.length > ref.raw_size + SLACK_BYTES:
                        raise DataLoss(
                            f"the bulk connection's chunk {ref.index} has the wrong size "
                            f"({frame.raw_size} raw, {frame.length} sent; "
                            f"{ref.raw_size} expected)"
                        )
                    data = self._payload(frame, fd)
                self.encoded_bytes += frame.length
                if not self._put((frame.codec, data)):
                    return
                del data
            frame, fd = self._frame()
            with shm.closing(fd):
                if not frame.is_end or fd is not None:
                    raise DataLoss("the bulk connection sent more chunks than were asked for")
            self._put(_END)
        except BulkProtocolError as exc:
            if not self._stop.is_set():
                self._put(BulkEnded(str(exc)))
        except OSError as exc:
            if not self._stop.is_set():
                self._put(BulkEnded(f"the bulk connection failed: {exc}"))
        except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread
            self._put(exc)

    def _frame(self) -> tuple[ChunkHead, int | None]:
        """The next frame head (and, on shared memory, the file that came with it)."""
        if self._shared_memory:
            return shm.receive_frame(self._sock)
        head = bytearray(HEAD_BYTES)
        recv_exactly(self._sock, head)
        return parse_head(head), None

    def _payload(self, frame: ChunkHead, fd: int | None) -> bytes | bytearray | memoryview:
        """The frame's bytes: read off the socket, or the file that came with it mapped
        (and acknowledged; the caller closes the file)."""
        if not self._shared_memory:
            data, view = self._pool.take(frame.length)
            try:
                recv_exactly(self._sock, view)
            finally:
                view.release()
            return data
        if fd is None:
            raise BulkProtocolError(f"chunk {frame.index} came without its file")
        mapped = shm.map_sealed(fd, frame.length)
        shm.acknowledge(self._sock)
        return mapped

    def _take(self) -> object:
        return take_unless_closed(self._queue, self._stop)

    def _put(self, item: object) -> bool:
        return put_unless_closed(self._queue, item, self._stop)


class BulkEnded(DataLoss):
    """The bulk connection ended before the last chunk: the gRPC stream's status says why
    (the thaw stream raises that instead, when there is one)."""
