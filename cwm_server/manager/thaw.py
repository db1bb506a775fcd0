"""One Thaw stream: read chunks ahead of the sender, at most `stream_window_chunks` of them.

The reader task fills a bounded queue; the gRPC writer drains it. A client that stops
reading stalls the writer (HTTP/2 flow control), the queue fills, the reader waits: memory
stays at a few chunks however large the window is and however long the client pauses.
Every chunk is verified against its digest before its first byte is sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from cwm_client import pb
from cwm_client.chunks import iter_parts
from cwm_client.codecs import RAW
from cwm_client.errors import InvalidArgument
from cwm_client.names import check_window_name
from cwm_server.manager.windows import WindowManager, window_not_found

_DONE = object()


class ThawPlan:
    """A thaw that has been checked and pinned; `close()` must follow, whatever happens."""

    def __init__(
        self,
        manager: WindowManager,
        tenant: str,
        window: pb.WindowInfo,
        refs: list[pb.ChunkRef],
        part_bytes: int,
    ) -> None:
        self.window = window
        self._manager = manager
        self._tenant = tenant
        self._refs = refs
        self._part_bytes = part_bytes
        # Pinned before the first await of the stream: a delete racing this thaw must not
        # unlink files the stream is about to read.
        self._pins = manager.pin(tenant, [r.digest for r in refs])

    def close(self) -> None:
        self._manager.unpin(self._pins)
        self._pins = []

    async def chunks(self) -> AsyncIterator[pb.Chunk]:
        manager = self._manager
        queue: asyncio.Queue[object] = asyncio.Queue(manager.config.stream_window_chunks)

        async def read_ahead() -> None:
            try:
                for ref in self._refs:
                    where = f"window {self.window.name!r} chunk {ref.index}"
                    raw = await manager.io(manager.store.get, self._tenant, ref.digest, where)
                    await queue.put((ref, raw))
                await queue.put(_DONE)
            except Exception as exc:  # noqa: BLE001 - handed to the writer, which raises it
                await queue.put(exc)

        reader = asyncio.ensure_future(read_ahead())
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, Exception):
                    raise item
                ref, raw = item  # type: ignore[misc]
                for part in iter_parts(ref, raw, RAW, self._part_bytes):
                    yield part
                del raw, item
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


async def open_thaw(manager: WindowManager, tenant: str, request: pb.ThawRequest) -> ThawPlan:
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
    part_bytes = request.max_part_bytes or manager.config.part_bytes
    part_bytes = max(64 << 10, min(part_bytes, manager.config.part_bytes))
    refs = list(window.chunks[request.first_chunk : end])
    return ThawPlan(manager, tenant, window, refs, part_bytes)
