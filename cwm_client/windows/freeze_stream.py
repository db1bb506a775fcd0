"""Writing a Freeze stream: the header, then every chunk to send split into parts, and the
plan both window clients follow to freeze over one stream or several.

Chunk bytes are read lazily, one chunk at a time, and copied once, into the message.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass

from cwm_client import pb
from cwm_client.bulk import shm
from cwm_client.chunks import (
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_PART_BYTES,
    DTYPE_SIZE,
    ChunkPayload,
    fill_parts,
)
from cwm_client.codecs import CODECS, RAW, encode_for_wire
from cwm_client.errors import InvalidArgument
from cwm_client.messages import build
from cwm_client.windows.parallel import auto_streams, new_upload_id, stage_header
from cwm_client.windows.progress import Progress, ProgressSum


@dataclass(frozen=True)
class FreezeResult:
    """What a freeze committed and what it had to move."""

    window: pb.WindowInfo
    chunks_sent: int
    chunks_reused: int
    bytes_sent: int
    """Encoded bytes the manager received (smaller than the raw bytes with a wire codec)."""
    streams: int = 1
    """How many streams carried the chunks."""
    transport: str = "grpc"
    """What carried them: "grpc", or the bulk transport ("shm", "unix", "tcp")."""


def build_header(
    name: str,
    chunks: Sequence[ChunkPayload],
    *,
    fingerprint: pb.ModelFingerprint,
    token_ids: Sequence[int],
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    session_id: str = "",
    cache_salt: str = "",
    parent: str = "",
    tags: Mapping[str, str] | None = None,
    description: str = "",
    ttl_seconds: int = 0,
    pinned: bool = False,
    replace: bool = False,
) -> pb.FreezeHeader:
    """The FreezeHeader for a window made of `chunks`, in index order."""
    for position, chunk in enumerate(chunks):
        if chunk.index != position:
            raise InvalidArgument(
                f"chunks must be given in index order: position {position} holds "
                f"chunk {chunk.index}"
            )
    return build(
        pb.FreezeHeader,
        name=name,
        session_id=session_id,
        cache_salt=cache_salt,
        fingerprint=fingerprint,
        token_ids=token_ids,
        chunk_tokens=chunk_tokens,
        chunk_digests=[c.digest for c in chunks],
        parent=parent,
        tags=dict(tags or {}),
        description=description,
        ttl_seconds=ttl_seconds,
        pinned=pinned,
        replace=replace,
    )


def _freeze_request() -> tuple[pb.FreezeRequest, pb.Chunk]:
    request = pb.FreezeRequest()
    return request, request.chunk


def freeze_requests(
    header: pb.FreezeHeader,
    to_send: Sequence[ChunkPayload],
    part_bytes: int = DEFAULT_PART_BYTES,
    progress: Progress | None = None,
    wire_codec: int = RAW,
) -> Iterator[pb.FreezeRequest]:
    """The header, then each chunk to send split into parts. Chunk bytes are read lazily,
    one chunk at a time, so the client's memory stays at one chunk however big the window.

    With a `wire_codec` other than RAW, each chunk is sent encoded with it when that makes
    it at least 10% smaller (the manager then stores it as it came); messages are built in
    place, so the chunk bytes are copied once, into the message.
    """
    if wire_codec not in CODECS:
        raise InvalidArgument(f"unknown wire codec {wire_codec}", field="wire_codec")
    yield pb.FreezeRequest(header=header)
    word = DTYPE_SIZE.get(header.fingerprint.kv_dtype, 1)
    accepted = (wire_codec,)
    total = sum(c.raw_size for c in to_send)
    done = 0
    if progress is not None:
        progress(0, total)
    for chunk in to_send:
        codec, encoded = wire_bytes(chunk, accepted, word)
        yield from fill_parts(_freeze_request, chunk, encoded, codec, part_bytes)
        del encoded
        done += chunk.raw_size
        if progress is not None:
            progress(done, total)


def wire_bytes(
    chunk: ChunkPayload, accepted: tuple[int, ...], word: int
) -> tuple[int, bytes | memoryview]:
    """A chunk to send, as (codec, bytes): its raw bytes, checked against its raw size, or
    encoded with the wire codec where that pays. Any transport sends these."""
    raw = chunk.data()
    if len(raw) != chunk.raw_size:
        raise InvalidArgument(
            f"chunk {chunk.index}: data() returned {len(raw)} bytes, raw_size says {chunk.raw_size}"
        )
    if accepted == (RAW,):
        return RAW, raw
    return encode_for_wire(raw, accepted, word)


@dataclass(frozen=True)
class FreezePlan:
    """What one freeze sends and over how many streams; the clients only add the waiting.

    With one stream the header and the chunks go on it. With several, each stream stages
    its share of the chunks (every N-th) under one upload id, and a last header-only
    stream commits the window, so it still appears atomically or not at all.
    """

    header: pb.FreezeHeader
    to_send: Sequence[ChunkPayload]
    streams: int
    upload_id: str = ""
    """The id the streams of a parallel freeze stage under ("" with one stream)."""

    @staticmethod
    def choose(
        header: pb.FreezeHeader,
        chunks: Sequence[ChunkPayload],
        missing: Collection[bytes] | None,
        requested_streams: int | None,
    ) -> FreezePlan:
        """Send the chunks whose digest is in `missing` (all of them when None)."""
        to_send = [c for c in chunks if missing is None or c.digest in missing]
        count = auto_streams(sum(c.raw_size for c in to_send), len(to_send), requested_streams)
        return FreezePlan(header, to_send, count, new_upload_id() if count > 1 else "")

    def for_bulk(self) -> FreezePlan:
        """The plan of a freeze whose chunks go on one bulk connection: they are staged
        under a fresh upload id and committed by `commit_requests`, as a parallel freeze's."""
        return FreezePlan(self.header, self.to_send, 1, new_upload_id())

    def offer_request(self, transports: Sequence[int]) -> pb.OfferBulkFreezeRequest:
        """What asks the manager for a bulk connection to stage this plan's chunks
        (shared memory only for chunks large enough for it to pay, unless forced)."""
        staging = stage_header(self.header, self.upload_id, stage_only=True)
        mean_chunk = sum(c.raw_size for c in self.to_send) / max(1, len(self.to_send))
        return pb.OfferBulkFreezeRequest(
            header=staging,
            bulk_transports=shm.preferred(transports, mean_chunk),  # type: ignore[arg-type]
        )

    def requests(
        self, part_bytes: int, progress: Progress | None, wire_codec: int
    ) -> Iterator[pb.FreezeRequest]:
        """The whole freeze on one stream."""
        return freeze_requests(self.header, self.to_send, part_bytes, progress, wire_codec)

    def staging_requests(
        self, part_bytes: int, progress: Progress | None, wire_codec: int
    ) -> list[Iterator[pb.FreezeRequest]]:
        """One request stream per stream of a parallel freeze, each staging its share."""
        staging = stage_header(self.header, self.upload_id, stage_only=True)
        sums = ProgressSum(progress, sum(c.raw_size for c in self.to_send))
        count = self.streams
        return [
            freeze_requests(staging, self.to_send[i::count], part_bytes, sums.stream(), wire_codec)
            for i in range(count)
        ]

    def commit_requests(self) -> Iterator[pb.FreezeRequest]:
        """The header-only stream that commits what the staging streams sent."""
        commit = stage_header(self.header, self.upload_id, stage_only=False)
        return iter([pb.FreezeRequest(header=commit)])

    def bulk_result(
        self, sent_chunks: int, sent_bytes: int, committed: pb.FreezeResponse, transport: str
    ) -> FreezeResult:
        """The result of a freeze whose chunks went on a bulk connection."""
        return FreezeResult(
            window=committed.window,
            chunks_sent=sent_chunks,
            chunks_reused=committed.chunks_reused,
            bytes_sent=sent_bytes,
            transport=transport,
        )

    def result(self, response: pb.FreezeResponse) -> FreezeResult:
        """The result of a one-stream freeze."""
        return FreezeResult(
            window=response.window,
            chunks_sent=response.chunks_received,
            chunks_reused=response.chunks_reused,
            bytes_sent=response.bytes_received,
        )

    def parallel_result(
        self, staged: Sequence[pb.FreezeResponse], committed: pb.FreezeResponse
    ) -> FreezeResult:
        """The result of a parallel freeze: what the staging streams moved, what the commit
        reused."""
        return FreezeResult(
            window=committed.window,
            chunks_sent=sum(r.chunks_received for r in staged),
            chunks_reused=committed.chunks_reused,
            bytes_sent=sum(r.bytes_received for r in staged),
            streams=self.streams,
        )
