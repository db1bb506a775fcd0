"""What the blocking and asyncio thaw streams share: the window read from the first stream,
the stripe each stream of a parallel thaw carries, and the checks that put the chunks of
several streams back in order. The two streams differ only in how they wait (threads and
queues, or tasks and asyncio queues)."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

from cwm_client import pb
from cwm_client.bulk.connection import transport_name
from cwm_client.bulk.thaw_reader import BulkThawReader
from cwm_client.errors import DataLoss
from cwm_client.thawed import ThawedChunk
from cwm_client.windows.thaw_decoder import ThawDecoder, expected_chunks

END_OF_STREAM = object()
"""Queued by a stream's reader after its last chunk."""


class ThawStreamCore:
    """The state of one thaw over one or more calls; see `ThawStream`."""

    def __init__(
        self,
        call: Any,
        first_chunk: int,
        chunk_count: int,
        more_calls: Sequence[Any],
        read_ahead: int,
    ) -> None:
        self._calls = [call, *more_calls]
        self._decoder = ThawDecoder()
        self._decoders = [self._decoder]
        self._first_chunk = first_chunk
        self._chunk_count = chunk_count
        self._read_ahead = max(1, read_ahead)
        self._expected = 0
        self.window = pb.WindowInfo()
        self._bulk: BulkThawReader | None = None
        self._pushed_back: list[pb.ThawResponse] = []
        """The first chunk message, read where a bulk offer could have been."""
        self.transport = "grpc"
        """What carries the chunks: "grpc", or the bulk transport taken ("shm", "unix", "tcp")."""

    @property
    def streams(self) -> int:
        """How many streams carry this thaw."""
        return len(self._calls)

    @property
    def encoded_bytes(self) -> int:
        """Chunk bytes received so far, as they came over the wire (encoded)."""
        return sum(decoder.encoded_bytes for decoder in self._decoders)

    def _accept_window(self, first: pb.ThawResponse) -> None:
        """Take the first message of the first stream: the window this thaw reads."""
        self._decoder.accept(first)
        assert self._decoder.window is not None
        self.window = self._decoder.window
        self._expected = expected_chunks(self.window, self._first_chunk, self._chunk_count)

    def _offer_in(self, second: pb.ThawResponse) -> pb.BulkOffer | None:
        """The bulk offer the stream's second message makes, if it does (otherwise it is
        the first chunk message, kept to be read first)."""
        if second.WhichOneof("payload") == "bulk":
            return second.bulk
        self._pushed_back.append(second)
        return None

    def _start_bulk(self, offer: pb.BulkOffer, sock: socket.socket) -> None:
        """Read this thaw's chunks from `sock`, the connection `offer` named."""
        end = self._first_chunk + self._expected
        refs = self.window.chunks[self._first_chunk : end]
        shared_memory = offer.transport == pb.BulkTransport.BULK_TRANSPORT_SHM
        self._bulk = BulkThawReader(sock, self.window, refs, self._read_ahead, shared_memory)
        self.transport = transport_name(offer)

    def _bulk_counted(self, bulk: BulkThawReader) -> None:
        """What the bulk connection moved, counted as the stream's."""
        self._decoder.received = bulk.received
        self._decoder.encoded_bytes = bulk.encoded_bytes

    def _stripes(self) -> list[tuple[Any, ThawDecoder, int]]:
        """Each stream's call, decoder and chunk count in a parallel thaw. The other
        streams' decoders check every chunk against the window the first stream described,
        so a window replaced mid-thaw is caught."""
        stride = len(self._calls)
        stripes: list[tuple[Any, ThawDecoder, int]] = []
        for i, call in enumerate(self._calls):
            share = expected_chunks(
                self.window,
                self._first_chunk + i,
                0 if self._chunk_count == 0 else max(0, self._chunk_count - i),
                stride,
            )
            decoder = self._decoder if i == 0 else ThawDecoder(reference=self.window)
            if i:
                self._decoders.append(decoder)
            stripes.append((call, decoder, share))
        return stripes

    def _in_order(self, item: object, position: int) -> ThawedChunk:
        """The chunk at `position` of the thaw, as taken from stream position % N, or the
        error that stream handed over."""
        if isinstance(item, BaseException):
            raise item
        stride = len(self._calls)
        if not isinstance(item, ThawedChunk):
            raise DataLoss(f"thaw stream {position % stride} ended early")
        if item.index != self._first_chunk + position:
            raise DataLoss(
                f"thaw stream {position % stride} sent chunk {item.index} where chunk "
                f"{self._first_chunk + position} was due"
            )
        return item

    @staticmethod
    def _drained(item: object) -> None:
        """What a stream queued after its last expected chunk: its end, nothing more."""
        if isinstance(item, BaseException):
            raise item
        if item is not END_OF_STREAM:
            raise DataLoss("a thaw stream sent more chunks than it was asked for")
