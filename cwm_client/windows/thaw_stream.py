"""The blocking thaw stream: `WindowClient.thaw` returns one."""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any

import grpc

from cwm_client import pb
from cwm_client.bulk.connection import BulkUnreachable
from cwm_client.bulk.thaw_reader import BulkEnded, BulkThawReader
from cwm_client.errors import DataLoss, from_rpc_error
from cwm_client.queues import put_unless_closed, take_unless_closed
from cwm_client.thawed import ThawedChunk
from cwm_client.windows.thaw_decoder import ThawDecoder
from cwm_client.windows.thaw_stream_core import END_OF_STREAM, ThawStreamCore


class ThawStream(ThawStreamCore):
    """A running Thaw: `window` first, then iterate for verified chunks in order.

    A thaw read over several streams (see `WindowClient.thaw`) looks the same: one reader
    thread per stream assembles, decodes and verifies its share of the chunks (BLAKE3
    releases the GIL, so the checks overlap) into a queue of at most `read_ahead` chunks,
    and iteration takes chunk k from stream k % N, so chunks still come out in order and the
    client holds a few chunks per stream at most.

    Closing (or leaving the `with` block) cancels the calls, so an abandoned thaw frees the
    manager's streams at once.
    """

    def __init__(
        self,
        call: Any,
        first_chunk: int,
        chunk_count: int,
        *,
        more_calls: Sequence[Any] = (),
        read_ahead: int = 4,
        bulk_connect: Callable[[pb.BulkOffer], socket.socket] | None = None,
    ) -> None:
        """`bulk_connect`: the request listed bulk transports; it opens the connection of
        the manager's offer, if one comes (BulkUnreachable when it cannot)."""
        super().__init__(call, first_chunk, chunk_count, more_calls, read_ahead)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._queues: list[queue.Queue[object]] = []
        try:
            first = next(call)
            self._accept_window(first)
            if bulk_connect is not None and len(self._calls) == 1 and self._expected:
                self._take_offer(next(call, None), bulk_connect)
        except grpc.RpcError as exc:
            self.close()
            raise from_rpc_error(exc) from None
        except BaseException:
            self.close()
            raise
        if len(self._calls) > 1:
            for i, (stream_call, decoder, share) in enumerate(self._stripes()):
                shared: queue.Queue[object] = queue.Queue(self._read_ahead)
                self._queues.append(shared)
                thread = threading.Thread(
                    target=self._read,
                    args=(stream_call, decoder, share, shared),
                    name=f"cwm-thaw-{i}",
                    daemon=True,
                )
                self._threads.append(thread)
            for thread in self._threads:
                thread.start()

    def __iter__(self) -> Iterator[ThawedChunk]:
        if len(self._calls) == 1:
            yield from self._iter_one()
            return
        finished = False
        try:
            stride = len(self._calls)
            for position in range(self._expected):
                yield self._in_order(self._take(self._queues[position % stride]), position)
            for shared in self._queues:
                self._drained(self._take(shared))
            finished = True
        finally:
            if not finished:
                self.close()

    def _take_offer(
        self,
        second: pb.ThawResponse | None,
        bulk_connect: Callable[[pb.BulkOffer], socket.socket],
    ) -> None:
        if second is None or (offer := self._offer_in(second)) is None:
            return  # no offer: the chunks come on this stream (or it ended: finish() says)
        try:
            sock = bulk_connect(offer)
        except OSError as exc:
            raise BulkUnreachable(offer, exc) from None
        self._start_bulk(offer, sock)

    def _iter_one(self) -> Iterator[ThawedChunk]:
        if self._bulk is not None:
            yield from self._iter_bulk(self._bulk)
            return
        try:
            for message in self._pushed_back:
                chunk = self._decoder.accept(message)
                if chunk is not None:
                    yield chunk
            for message in self._calls[0]:
                chunk = self._decoder.accept(message)
                if chunk is not None:
                    yield chunk
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        self._decoder.finish(self._expected)

    def _iter_bulk(self, bulk: BulkThawReader) -> Iterator[ThawedChunk]:
        """The chunks from the bulk connection, then the gRPC stream's end: its status is
        the transfer's (a failure on the manager's side closes the connection and ends the
        stream with the reason)."""
        try:
            yield from bulk
        except BulkEnded as ended:
            self._raise_stream_status()
            raise ended from None
        finally:
            self._bulk_counted(bulk)
        self._raise_stream_status()

    def _raise_stream_status(self) -> None:
        try:
            for _ in self._calls[0]:
                raise DataLoss("the thaw stream sent a message after its bulk offer")
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def _read(
        self, call: Any, decoder: ThawDecoder, expected: int, shared: queue.Queue[object]
    ) -> None:
        try:
            for message in call:
                chunk = decoder.accept(message)
                if chunk is not None and not self._put(shared, chunk):
                    return
            decoder.finish(expected)
            self._put(shared, END_OF_STREAM)
        except grpc.RpcError as exc:
            if not self._stop.is_set():
                self._put(shared, from_rpc_error(exc))
        except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread
            self._put(shared, exc)

    def _take(self, shared: queue.Queue[object]) -> object:
        return take_unless_closed(shared, self._stop)

    def _put(self, shared: queue.Queue[object], item: object) -> bool:
        return put_unless_closed(shared, item, self._stop)

    def close(self) -> None:
        self._stop.set()
        for call in self._calls:
            call.cancel()
        if self._bulk is not None:
            self._bulk.close()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)

    def __enter__(self) -> ThawStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
