"""The asyncio thaw stream: `AsyncWindowClient.thaw` returns one, already open."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any

import grpc
from grpc.aio import EOF  # type: ignore[attr-defined]

from cwm_client import pb
from cwm_client.bulk.connection import BulkUnreachable
from cwm_client.bulk.thaw_reader import BulkEnded, BulkThawReader
from cwm_client.errors import Cancelled, DataLoss, from_rpc_error
from cwm_client.queues import POLL_S
from cwm_client.thawed import ThawedChunk
from cwm_client.windows.thaw_decoder import ThawDecoder
from cwm_client.windows.thaw_stream_core import END_OF_STREAM, ThawStreamCore

OFF_LOOP_CHUNK_BYTES = 1 << 16
"""The parts of a chunk larger than this (encoded) are taken on a worker thread, where the
last one's decode and BLAKE3 check run, so the streams' checks overlap and the event loop
stays free; for a smaller chunk the hand-off would cost more than the work."""


class AsyncThawStream(ThawStreamCore):
    """A running Thaw: `await open()` reads the window, then `async for` the chunks.

    Over several streams (see `AsyncWindowClient.thaw`), one task per stream reads its share
    of the chunks, assembles and verifies them (the BLAKE3 check on a worker thread, so the
    streams' checks overlap) into a queue of at most `read_ahead` chunks, and iteration
    takes chunk k from stream k % N: chunks still come out in order.
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
        """`bulk_connect` as in `ThawStream` (it runs on a worker thread here)."""
        super().__init__(call, first_chunk, chunk_count, more_calls, read_ahead)
        self._queues: list[asyncio.Queue[object]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._bulk_connect = bulk_connect

    async def open(self) -> AsyncThawStream:
        """Read the window (and take the bulk offer, if one comes: BulkUnreachable when it
        cannot be taken; the call is cancelled then)."""
        try:
            first = await self._calls[0].read()
            if first is EOF:
                raise DataLoss("thaw stream ended before the window info")
            self._accept_window(first)
            if self._bulk_connect is not None and len(self._calls) == 1 and self._expected:
                await self._take_offer(self._bulk_connect)
        except grpc.RpcError as exc:
            self.close()
            raise from_rpc_error(exc) from None
        except BaseException:
            self.close()
            raise
        if len(self._calls) > 1:
            for call, decoder, share in self._stripes():
                shared: asyncio.Queue[object] = asyncio.Queue(self._read_ahead)
                self._queues.append(shared)
                self._tasks.append(asyncio.ensure_future(self._read(call, decoder, share, shared)))
        return self

    async def __aiter__(self) -> AsyncIterator[ThawedChunk]:
        if len(self._calls) == 1:
            async for chunk in self._iter_one():
                yield chunk
            return
        finished = False
        stride = len(self._calls)
        try:
            for position in range(self._expected):
                yield self._in_order(await self._take(self._queues[position % stride]), position)
            for shared in self._queues:
                self._drained(await self._take(shared))
            finished = True
        finally:
            if not finished:
                self.close()

    async def _take_offer(self, bulk_connect: Callable[[pb.BulkOffer], socket.socket]) -> None:
        second = await self._calls[0].read()
        if second is EOF or (offer := self._offer_in(second)) is None:
            return
        try:
            sock = await asyncio.to_thread(bulk_connect, offer)
        except OSError as exc:
            raise BulkUnreachable(offer, exc) from None
        self._start_bulk(offer, sock)

    async def _iter_bulk(self, bulk: BulkThawReader) -> AsyncIterator[ThawedChunk]:
        """As `ThawStream._iter_bulk`: each chunk taken (and verified) on a worker thread,
        then the gRPC stream's status."""
        chunks = iter(bulk)
        try:
            while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                yield chunk
        except BulkEnded as ended:
            await self._raise_stream_status()
            raise ended from None
        finally:
            self._bulk_counted(bulk)
        await self._raise_stream_status()

    async def _raise_stream_status(self) -> None:
        try:
            if await self._calls[0].read() is not EOF:
                raise DataLoss("the thaw stream sent a message after its bulk offer")
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def _iter_one(self) -> AsyncIterator[ThawedChunk]:
        if self._bulk is not None:
            async for bulk_chunk in self._iter_bulk(self._bulk):
                yield bulk_chunk
            return
        try:
            for message in self._pushed_back:
                if (early := self._decoder.accept(message)) is not None:
                    yield early
            while True:
                message = await self._calls[0].read()
                if message is EOF:
                    break
                chunk = self._decoder.accept(message)
                if chunk is not None:
                    yield chunk
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        self._decoder.finish(self._expected)

    async def _read(
        self, call: Any, decoder: ThawDecoder, expected: int, shared: asyncio.Queue[object]
    ) -> None:
        try:
            while True:
                message = await call.read()
                if message is EOF:
                    break
                if (
                    message.WhichOneof("payload") == "chunk"
                    and message.chunk.encoded_size > OFF_LOOP_CHUNK_BYTES
                ):
                    chunk = await asyncio.to_thread(decoder.accept, message)
                else:
                    chunk = decoder.accept(message)
                if chunk is not None:
                    await shared.put(chunk)
            decoder.finish(expected)
            await shared.put(END_OF_STREAM)
        except grpc.RpcError as exc:
            await shared.put(from_rpc_error(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the consuming task
            await shared.put(exc)

    async def _take(self, shared: asyncio.Queue[object]) -> object:
        while True:
            try:
                async with asyncio.timeout(POLL_S):  # not wait_for: it can swallow a cancel
                    return await shared.get()
            except TimeoutError:
                if self._closed:
                    raise Cancelled("the thaw was closed while a chunk was awaited") from None

    def close(self) -> None:
        self._closed = True
        for call in self._calls:
            call.cancel()
        for task in self._tasks:
            task.cancel()
        if self._bulk is not None:
            self._bulk.close()

    async def __aenter__(self) -> AsyncThawStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
