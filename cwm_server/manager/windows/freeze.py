"""One Freeze stream: validate the header, receive and store chunks with bounded staging,
and commit the window atomically, or leave nothing behind.

Receiving and storing overlap: at most `stream_window_chunks` received chunks wait for or
are being stored (and one more is being received); when that many are in hand the receiver
stops reading, HTTP/2 flow control (or the bulk connection's socket) stops the sender, and
the manager's memory stays bounded whatever the window's size. Each chunk in hand is also
counted against the hot tier's cap (`ChunkStore.reserve_memory`), which makes room for it,
so a transfer adds at most one chunk to what the cap allows.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import structlog

from cwm_client import pb
from cwm_client.chunks import DTYPE_SIZE, AssembledChunk, ChunkAssembler, chunk_raw_size
from cwm_client.codecs import decode
from cwm_client.errors import FailedPrecondition, InvalidArgument
from cwm_server.manager.catalog.base import NewChunk, WindowExists, basic_view
from cwm_server.manager.quotas import Reservation, declared_chunks, reserve_on_catalog_thread
from cwm_server.manager.tiers.store import StoreResult
from cwm_server.manager.windows.checks import expiry_from_ttl
from cwm_server.manager.windows.header import Spans, check_chunk_start, validate_header, window_info
from cwm_server.manager.windows.manager import WindowManager, window_exists_error

log = structlog.get_logger("cwm.freeze")

CANCEL_SETTLE_S = 0.005
"""How long a freeze waits after its request stream ends before committing.

grpc.aio ends the request iterator the same way for a client's half-close (the stream is
complete) and for a client's cancel (it is not); the cancel itself reaches the handler as a
CancelledError a moment later. Committing at once let a cancelled freeze become visible
now and then when the client cancelled after its last chunk. Waiting this long lets the
cancel land first; a cancel that arrives while the commit runs still rolls it
back (see `FreezeStream._abandoned`)."""


@dataclass
class _Received:
    chunks: dict[bytes, NewChunk] = field(default_factory=dict)
    count: int = 0
    encoded_bytes: int = 0
    started: set[bytes] = field(default_factory=set)
    """Digests whose store began: their files may exist even if the stream fails."""
    writes: list[concurrent.futures.Future[StoreResult]] = field(default_factory=list)
    """Every disk write submitted, so a failed stream can wait for them before cleaning."""


class FreezeStream:
    """One Freeze call (not to be confused with SessionService.FreezeSession, an order to
    an agent, which ends in such a stream from the agent)."""

    def __init__(self, manager: WindowManager, tenant: str) -> None:
        self._manager = manager
        self._tenant = tenant
        self._received = _Received()
        self._pins: list[tuple[str, bytes]] = []
        self._abandoned = threading.Event()
        """Set when the stream fails or is cancelled; a commit still running rolls back."""
        self._reservation = Reservation(None, (tenant, ""))
        """What this freeze holds of its tenant's quota until it commits or fails."""

    async def run(self, requests: AsyncIterator[pb.FreezeRequest]) -> pb.FreezeResponse:
        """A Freeze call: its header, then the chunk parts of its request stream."""
        first = await anext(requests, None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidArgument(
                "the first Freeze message must be a header (FreezeHeader)", field="header"
            )
        max_encoded = self._manager.config.max_chunk_bytes + (1 << 16)
        return await self.store(
            first.header,
            lambda header, spans: _assembled(requests, header, spans, max_encoded),
        )

    async def store(self, header: pb.FreezeHeader, chunks: ChunkSource) -> pb.FreezeResponse:
        """Check `header`, store the whole chunks `chunks(header, spans)` yields (a gRPC
        stream's, or a bulk connection's) and commit, or only stage them (stage_only)."""
        spans = validate_header(header, self._manager.config.max_chunk_bytes)
        uploads = self._manager.uploads
        upload = uploads.join(self._tenant, header) if header.upload_id else None
        self._pins = self._manager.pin(self._tenant, header.chunk_digests)
        committed = False
        try:
            if not header.replace and await self._manager.db(
                self._manager.catalog.window_exists, self._tenant, header.name
            ):
                raise window_exists_error(header.name)
            self._reservation = await self._reserve_quota(header, spans)
            await self._receive(chunks(header, spans), DTYPE_SIZE[header.fingerprint.kv_dtype])
            await asyncio.sleep(CANCEL_SETTLE_S)
            if header.stage_only:
                assert upload is not None
                uploads.stage(upload, dict(self._received.chunks))
                log.info(
                    "staged",
                    tenant=self._tenant,
                    window=header.name,
                    upload=header.upload_id,
                    received=self._received.count,
                )
                return pb.FreezeResponse(
                    chunks_received=self._received.count,
                    bytes_received=self._received.encoded_bytes,
                )
            staged = dict(upload.chunks) if upload is not None else {}
            window, freed, from_staged = await self._commit(header, spans, staged)
            committed = True
        except BaseException:
            self._abandoned.set()
            await self._discard()
            if upload is not None:
                # Files this stream wrote that its upload's other streams still pin: the
                # upload collects them when it closes.
                uploads.add_leftovers(upload, self._received.started)
            raise
        finally:
            self._reservation.release()
            self._manager.unpin(self._pins)
            if upload is not None:
                uploads.leave(upload, close=not header.stage_only, committed=committed)
        await self._manager.collect(self._tenant, freed)
        log.info(
            "frozen",
            tenant=self._tenant,
            window=window.name,
            chunks=window.chunk_count,
            received=self._received.count,
            staged=from_staged,
            raw_bytes=window.raw_bytes,
        )
        return pb.FreezeResponse(
            window=basic_view(window),
            chunks_received=self._received.count,
            chunks_reused=max(0, window.chunk_count - self._received.count - from_staged),
            bytes_received=self._received.encoded_bytes,
            chunks_staged=from_staged,
        )

    async def _reserve_quota(self, header: pb.FreezeHeader, spans: Spans) -> Reservation:
        """Reserve the chunks the header declares that the tenant does not store yet, and
        one window unless it replaces one, against the tenant's quota: RESOURCE_EXHAUSTED
        (QUOTA_EXCEEDED) before any byte is received if they do not fit. Runs on the
        catalog thread, so no commit lands between reading the usage and reserving."""
        manager = self._manager
        tenant = self._tenant
        if not manager.quotas.limited(tenant):
            return Reservation(None, (tenant, ""))
        sizes = [chunk_raw_size(header.fingerprint, count) for _, count in spans]
        key = f"upload:{header.upload_id}" if header.upload_id else f"stream:{id(self):x}"
        catalog = manager.catalog

        def _reserve() -> Reservation:
            replaces = header.replace and catalog.window_exists(tenant, header.name)
            return manager.quotas.reserve(
                tenant,
                key,
                usage=lambda: catalog.tenant_usage(tenant),
                new_chunks=lambda: declared_chunks(
                    header.chunk_digests, sizes, lambda ds: catalog.has_chunk_rows(tenant, ds)
                ),
                new_windows=0 if replaces else 1,
            )

        # Not a plain `manager.db(_reserve)`: a stream cancelled while `_reserve` runs
        # must still release what it reserved (the `finally` in `run` only sees a handle
        # that reached it).
        return await manager.after_collecting_expired(
            tenant, lambda: reserve_on_catalog_thread(manager.db, _reserve)
        )

    async def _receive(self, chunks: AsyncIterator[AssembledChunk], word: int) -> None:
        window = self._manager.config.stream_window_chunks
        in_hand = asyncio.Semaphore(window)
        """Chunks received and not yet stored: the queue's and those being stored."""
        queue: asyncio.Queue[tuple[AssembledChunk, int] | None] = asyncio.Queue(window)
        storer = asyncio.ensure_future(self._store_all(queue, word, in_hand))
        store = self._manager.store
        try:
            async for whole in chunks:
                self._received.encoded_bytes += len(whole.data)
                await _acquire_or_fail(in_hand, storer)
                reserved = store.reserve_memory(len(whole.data))
                try:
                    await _put_or_fail(queue, (whole, reserved), storer)
                except BaseException:
                    store.release_memory(reserved)
                    in_hand.release()
                    raise
                del whole
            await _put_or_fail(queue, None, storer)
            await storer
        finally:
            if not storer.done():
                storer.cancel()
                await asyncio.gather(storer, return_exceptions=True)
            while not queue.empty():  # chunks the storer never took (it failed)
                left = queue.get_nowait()
                if left is not None:
                    store.release_memory(left[1])

    async def _store_all(
        self,
        queue: asyncio.Queue[tuple[AssembledChunk, int] | None],
        word: int,
        in_hand: asyncio.Semaphore,
    ) -> None:
        """Verify and store queued chunks, up to `parallel` at once on the I/O threads.

        Every chunk being stored also takes one of the manager's store slots (as many as
        I/O threads, shared by all streams), so the chunks held by N concurrent streams --
        the streams of one parallel freeze, say -- grow by one queue per stream, not by one
        queue and a full set of workers each."""
        parallel = max(1, min(self._manager.config.io_threads, 4))
        slots = self._manager.store_slots()
        in_flight: set[asyncio.Future[None]] = set()
        try:
            while (item := await queue.get()) is not None:
                chunk, reserved = item
                del item
                try:
                    while len(in_flight) >= parallel:
                        done, in_flight = await asyncio.wait(
                            in_flight, return_when=asyncio.FIRST_COMPLETED
                        )
                        for finished in done:
                            finished.result()
                    await slots.acquire()
                    task = asyncio.ensure_future(self._store_one(chunk, word))
                except BaseException:
                    self._manager.store.release_memory(reserved)
                    in_hand.release()
                    raise

                def done(_: object, reserved: int = reserved) -> None:
                    slots.release()
                    self._manager.store.release_memory(reserved)
                    in_hand.release()

                task.add_done_callback(done)
                in_flight.add(task)
                del chunk
            for finished in asyncio.as_completed(in_flight):
                await finished
        finally:
            for running in in_flight:
                running.cancel()

    async def _store_one(self, chunk: AssembledChunk, word: int) -> None:
        manager = self._manager
        self._received.started.add(chunk.digest)
        work = manager.submit_io(_decode_and_store, manager, self._tenant, chunk, word)
        self._received.writes.append(work)
        result = await asyncio.wrap_future(work)
        self._received.chunks[chunk.digest] = NewChunk(
            digest=chunk.digest,
            raw_size=chunk.raw_size,
            stored_size=result.stored_size,
            codec=result.codec,
        )
        self._received.count += 1

    async def _commit(
        self,
        header: pb.FreezeHeader,
        spans: Spans,
        staged: dict[bytes, NewChunk],
    ) -> tuple[pb.WindowInfo, list[bytes], int]:
        """Commit the window; returns it, the digests a replace freed, and how many of its
        chunks came from the upload's staging streams."""
        manager = self._manager
        tenant = self._tenant
        received = dict(self._received.chunks)
        from_staged = {d: c for d, c in staged.items() if d not in received}
        expires = expiry_from_ttl(header.ttl_seconds)

        def _commit_sync() -> tuple[pb.WindowInfo, list[bytes], int]:
            known: dict[bytes, NewChunk] = {**from_staged, **received}
            for index, digest in enumerate(header.chunk_digests):
                if digest in known:
                    continue
                row = manager.catalog.chunk(tenant, digest)
                if row is not None:
                    known[digest] = NewChunk(digest, row.raw_size, row.stored_size, row.codec)
                elif (on_disk := manager.store.verified_on_disk(tenant, digest)) is not None:
                    known[digest] = NewChunk(
                        digest, on_disk.raw_size, on_disk.stored_size, on_disk.codec
                    )
                else:
                    hint = (
                        f"; upload {header.upload_id!r} did not stage it (expired, or a "
                        "staging stream failed?)"
                        if header.upload_id
                        else ""
                    )
                    raise FailedPrecondition(
                        f"chunk {index} ({digest.hex()[:16]}…) was neither sent nor stored"
                        f"{hint}; ask FindMissingChunks again and send every chunk it lists",
                        field=f"chunk_digests[{index}]",
                        reason="CHUNK_NOT_SENT",
                    )
            _check_sizes(header, spans, known)
            window = window_info(tenant, header, spans, known, expires)
            try:
                freed = manager.catalog.commit_window(
                    window, known, header.replace, still_wanted=self._still_wanted
                )
            except WindowExists:
                raise window_exists_error(header.name) from None
            used = set(header.chunk_digests)
            return window, freed, sum(1 for d in from_staged if d in used)

        return await manager.db(_commit_sync)

    def _still_wanted(self) -> bool:
        return not self._abandoned.is_set()

    async def _discard(self) -> None:
        """After a failed stream: collect the files it wrote that no window references.

        Writes already running on I/O threads cannot be cancelled, so this waits for them
        first; otherwise a file could land after the clean-up and stay until a restart.
        """
        self._manager.unpin(self._pins)
        self._pins = []
        writes = list(self._received.writes)
        try:
            if writes:
                await asyncio.shield(asyncio.to_thread(concurrent.futures.wait, writes))
            await asyncio.shield(self._manager.collect(self._tenant, self._received.started))
        except Exception:  # noqa: BLE001 - start-up recovery collects whatever is left
            log.warning("discard_failed", tenant=self._tenant, chunks=len(writes))


ChunkSource = Callable[[pb.FreezeHeader, Spans], AsyncIterator[AssembledChunk]]
"""Where a freeze's whole chunks come from, given its checked header and chunk spans."""


async def _assembled(
    requests: AsyncIterator[pb.FreezeRequest],
    header: pb.FreezeHeader,
    spans: Spans,
    max_encoded_size: int,
) -> AsyncIterator[AssembledChunk]:
    """The whole chunks of a Freeze call's request stream, each checked at its first part
    against the header."""
    assembler = ChunkAssembler(max_encoded_size=max_encoded_size)
    last_index = -1
    async for request in requests:
        if request.WhichOneof("payload") != "chunk":
            raise InvalidArgument(
                "a Freeze stream carries one header, then only chunks", field="header"
            )
        part = request.chunk
        if not assembler.in_progress:
            check_chunk_start(part, header, spans, last_index)
            last_index = part.index
        whole = assembler.add(part)
        if whole is not None:
            yield whole
    if assembler.in_progress:
        raise InvalidArgument(
            f"the stream ended in the middle of chunk {last_index}", field="chunk.data"
        )


async def _put_or_fail(
    queue: asyncio.Queue[tuple[AssembledChunk, int] | None],
    item: tuple[AssembledChunk, int] | None,
    storer: asyncio.Future[None],
) -> None:
    """Queue a chunk for storing, but fail at once if the storer has failed."""
    if storer.done():
        storer.result()
    put = asyncio.ensure_future(queue.put(item))
    await asyncio.wait({put, storer}, return_when=asyncio.FIRST_COMPLETED)
    if not put.done():
        put.cancel()
    if storer.done():
        storer.result()


def _check_sizes(header: pb.FreezeHeader, spans: Spans, known: dict[bytes, NewChunk]) -> None:
    """Every chunk's size against the tokens the header gives it, whether it was sent on
    this stream (checked as it arrived too) or was already stored: a header whose token
    ids or chunk size do not fit the chunks it names is refused, not committed."""
    for index, digest in enumerate(header.chunk_digests):
        _start, count = spans[index]
        expected = chunk_raw_size(header.fingerprint, count)
        held = known[digest].raw_size
        if held != expected:
            raise InvalidArgument(
                f"chunk {index} ({digest.hex()[:16]}…) holds {held} bytes, but the header's "
                f"token_ids and chunk_tokens give it {count} tokens, which need {expected} "
                "with this fingerprint; send the token ids the chunks were made from",
                field="token_ids",
            )


async def _acquire_or_fail(semaphore: asyncio.Semaphore, storer: asyncio.Future[None]) -> None:
    """Wait for room for one more chunk, but fail at once if the storer has failed (it
    ends early only by failing: the end of the stream has not been queued)."""
    if storer.done():
        storer.result()
    acquire = asyncio.ensure_future(semaphore.acquire())
    await asyncio.wait({acquire, storer}, return_when=asyncio.FIRST_COMPLETED)
    if not acquire.done():
        acquire.cancel()
    elif storer.done():
        semaphore.release()  # room came, but so did the failure
    if storer.done():
        storer.result()


def _decode_and_store(
    manager: WindowManager, tenant: str, chunk: AssembledChunk, word: int
) -> StoreResult:
    """Decode (if the sender compressed), then verify against the digest and store durably
    (`ChunkStore.put`, which keeps the sender's encoding where it pays)."""
    try:
        raw = decode(chunk.data, chunk.codec, chunk.raw_size, word)
    except ValueError as exc:
        raise InvalidArgument(
            f"chunk {chunk.index}: data does not decode with its codec ({exc})",
            field="chunk.data",
        ) from None
    return manager.store.put(
        tenant, chunk.digest, raw, word, f"chunk {chunk.index}", received=(chunk.codec, chunk.data)
    )
