"""One Thaw stream: read chunks ahead of the sender, at most `stream_window_chunks` of them.

Up to `stream_window_chunks` chunks are in hand or being read at once: a memory-tier hit is
taken on the event loop (its seal checked there), any other read (disk: decode + verify;
Redis) runs on the I/O threads, and the writer sends them in order as they complete. A
client that stops reading stalls the writer (HTTP/2 flow control), the reads already
started finish, no new one starts: memory stays at a few chunks however large the window
is and however long the client pauses. Every chunk is verified (BLAKE3, or for a memory
hit the seal taken after its BLAKE3 check) before its first byte is sent.

The wire codec is negotiated per stream: raw unless the request lists codecs it accepts;
then a chunk the disk tier holds in an accepted codec is sent as stored (verified, not
re-encoded), and any other is encoded with the first accepted codec that pays.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections import deque
from collections.abc import AsyncIterator, Iterator

from cwm_client import pb
from cwm_client.chunks import DTYPE_SIZE
from cwm_client.codecs import CODECS, RAW, encode_for_wire
from cwm_client.errors import InvalidArgument
from cwm_client.names import check_window_name
from cwm_server.manager.catalog.base import basic_view
from cwm_server.manager.windows.manager import WindowManager, window_not_found
from cwm_server.manager.windows.wire import PreEncoded, part_size, thaw_parts

INLINE_MEMORY_BYTES = 4 << 20
"""Largest chunk whose memory-tier hit is checked on the event loop: a larger one's seal
check would hold the loop (and every other stream) too long."""

Fetched = tuple[int, bytes | memoryview]
"""(codec, data) of one chunk as it goes on the wire."""


class ThawStream:
    """One Thaw call, checked and its chunks pinned (`open_thaw`); `close()` must follow,
    whatever happens."""

    def __init__(
        self,
        manager: WindowManager,
        tenant: str,
        window: pb.WindowInfo,
        refs: list[pb.ChunkRef],
        part_bytes: int,
        accept_codecs: tuple[int, ...] = (),
        first_message: pb.WindowInfo | None = None,
    ) -> None:
        self.window = window if first_message is None else first_message
        """What the stream's first message carries (FULL view unless BASIC was asked)."""
        self._name = window.name
        self._manager = manager
        self._tenant = tenant
        self._refs = refs
        self._part_bytes = part_bytes
        self._accept = accept_codecs
        self._word = DTYPE_SIZE.get(window.fingerprint.kv_dtype, 1)
        # Pinned before the first await of the stream: a delete racing this thaw must not
        # unlink files the stream is about to read.
        self._pins = manager.pin(tenant, [r.digest for r in refs])

    def close(self) -> None:
        self._manager.unpin(self._pins)
        self._pins = []

    async def responses(self) -> AsyncIterator[PreEncoded]:
        """The chunk parts, in order, each a ThawResponse already in wire format (one copy
        of the bytes per part; see `wire`)."""
        part_bytes = self._part_bytes
        async for ref, codec, data in self.fetched():
            for response in thaw_parts(ref, data, codec, part_bytes):
                yield response

    @property
    def refs(self) -> list[pb.ChunkRef]:
        """The chunks this stream sends, in order."""
        return self._refs

    async def fetched(
        self, read_ahead: int | None = None
    ) -> AsyncIterator[tuple[pb.ChunkRef, int, bytes | memoryview]]:
        """Each chunk to send with its codec and bytes, in order, at most `read_ahead`
        (default: the manager's `stream_window_chunks`) in hand or being read at once."""
        manager = self._manager
        window_size = max(1, read_ahead or manager.config.stream_window_chunks)
        pending: deque[tuple[pb.ChunkRef, Fetched | concurrent.futures.Future[Fetched]]]
        pending = deque()
        refs: Iterator[pb.ChunkRef] = iter(self._refs)

        def refill() -> None:
            while len(pending) < window_size:
                ref = next(refs, None)
                if ref is None:
                    return
                hit = self._from_memory(ref)
                pending.append((ref, hit or manager.submit_io(self._fetch, ref)))

        refill()
        try:
            while pending:
                ref, fetch = pending.popleft()
                if not isinstance(fetch, tuple):
                    fetch = await asyncio.wrap_future(fetch)
                codec, data = fetch
                refill()  # the next read starts before this chunk goes out
                yield ref, codec, data
                del data, fetch
        finally:
            for _, fetch in pending:
                if not isinstance(fetch, tuple):
                    fetch.cancel()

    def _from_memory(self, ref: pb.ChunkRef) -> Fetched | None:
        """A raw-codec stream's chunk from the memory tier, checked there on the event loop
        (its seal is cheap): a hit skips two thread hand-offs, which on a thaw from memory
        cost more than the check. None: read it on an I/O thread (also chunks over
        INLINE_MEMORY_BYTES, whose check would hold the loop too long)."""
        if self._accept or ref.raw_size > INLINE_MEMORY_BYTES:
            return None
        raw = self._manager.store.get_from_memory(self._tenant, ref.digest)
        return None if raw is None else (RAW, raw)

    def _fetch(self, ref: pb.ChunkRef) -> Fetched:
        """Runs on an I/O thread: the chunk's bytes, verified, in the codec to send."""
        manager = self._manager
        where = f"window {self._name!r} chunk {ref.index}"
        if not self._accept:
            return RAW, manager.store.get(self._tenant, ref.digest, where)
        if ref.stored_codec in self._accept:
            stored = manager.store.get_as_stored(self._tenant, ref.digest, self._accept)
            if stored is not None:
                return stored.codec, stored.data
        raw = manager.store.get(self._tenant, ref.digest, where)
        return encode_for_wire(raw, self._accept, self._word)


async def open_thaw(manager: WindowManager, tenant: str, request: pb.ThawRequest) -> ThawStream:
    """Check the request and pin the chunks it will send."""
    check_window_name(request.name)
    window = await manager.db(manager.catalog.get_window, tenant, request.name, True)
    if window is None:
        raise window_not_found(request.name)
    if request.first_chunk and request.first_chunk >= window.chunk_count:
        raise InvalidArgument(
            f"first_chunk {request.first_chunk} is past the window's last chunk "
            f"({window.chunk_count} chunks)",
            field="first_chunk",
        )
    end = (
        window.chunk_count
        if request.chunk_count == 0
        else min(window.chunk_count, request.first_chunk + request.chunk_count)
    )
    stride = max(1, request.chunk_stride)
    configured = manager.config.part_bytes
    part_bytes = part_size(request.max_part_bytes, configured, ceiling=configured)
    refs = list(window.chunks[request.first_chunk : end : stride])
    # Codecs this manager does not know are skipped, not refused: a newer client may list
    # them first and still take what this manager can send.
    accept = tuple(dict.fromkeys(c for c in request.accept_codecs if c in CODECS and c != RAW))
    first_message = (
        basic_view(window) if request.window_view == pb.WindowView.WINDOW_VIEW_BASIC else None
    )
    return ThawStream(manager, tenant, window, refs, part_bytes, accept, first_message)
