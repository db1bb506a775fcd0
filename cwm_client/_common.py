"""Logic shared by the sync and asyncio clients: channel options, building freeze streams
and decoding thaw streams. The two client modules only differ in how they wait."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from cwm_client import pb
from cwm_client.chunks import (
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_PART_BYTES,
    DTYPE_SIZE,
    ChunkAssembler,
    ChunkPayload,
    digest,
    iter_parts,
)
from cwm_client.codecs import RAW, decode
from cwm_client.errors import DataLoss, InvalidArgument

DEFAULT_TARGET = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 16 << 20
"""Large enough for a 1 MiB part and for a WindowInfo listing ~4M token ids; the gRPC
default (4 MiB) is raised only this far."""

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

Progress = Callable[[int, int], None]
"""Called with (bytes_done, bytes_total) as a freeze or thaw moves chunk bytes."""


@dataclass(frozen=True)
class FreezeResult:
    """What a freeze committed and what it had to move."""

    window: pb.WindowInfo
    chunks_sent: int
    chunks_reused: int
    bytes_sent: int


@dataclass(frozen=True)
class ThawedChunk:
    """One chunk of a thawed window: raw canonical bytes, verified against the digest."""

    index: int
    token_start: int
    token_count: int
    digest: bytes
    data: bytes


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
    return pb.FreezeHeader(
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


def freeze_requests(
    header: pb.FreezeHeader,
    to_send: Sequence[ChunkPayload],
    part_bytes: int = DEFAULT_PART_BYTES,
    progress: Progress | None = None,
) -> Iterator[pb.FreezeRequest]:
    """The header, then each chunk to send split into parts. Chunk bytes are read lazily,
    one chunk at a time, so the client's memory stays at one chunk however big the window."""
    yield pb.FreezeRequest(header=header)
    total = sum(c.raw_size for c in to_send)
    done = 0
    if progress is not None:
        progress(0, total)
    for chunk in to_send:
        raw = chunk.data()
        if len(raw) != chunk.raw_size:
            raise InvalidArgument(
                f"chunk {chunk.index}: data() returned {len(raw)} bytes, raw_size says "
                f"{chunk.raw_size}"
            )
        for part in iter_parts(chunk, raw, RAW, part_bytes):
            yield pb.FreezeRequest(chunk=part)
        done += chunk.raw_size
        if progress is not None:
            progress(done, total)


class ThawDecoder:
    """Turns Thaw messages into a WindowInfo and verified ThawedChunks.

    The client verifies too: the manager already did, but bytes that crossed a network and
    two processes are only trusted once their digest is checked where they are used.
    """

    def __init__(self) -> None:
        self.window: pb.WindowInfo | None = None
        self._assembler = ChunkAssembler(max_encoded_size=1 << 40)
        self._word = 2
        self.received = 0

    def accept(self, message: pb.ThawResponse) -> ThawedChunk | None:
        kind = message.WhichOneof("payload")
        if kind == "window":
            self.window = message.window
            self._word = DTYPE_SIZE.get(message.window.fingerprint.kv_dtype, 1)
            return None
        if kind != "chunk" or self.window is None:
            raise DataLoss("thaw stream is malformed: chunk before window info")
        try:
            whole = self._assembler.add(message.chunk)
        except InvalidArgument as exc:
            raise DataLoss(f"thaw stream is malformed: {exc.message}") from exc
        if whole is None:
            return None
        try:
            raw = decode(whole.data, whole.codec, whole.raw_size, self._word)
        except ValueError as exc:
            raise DataLoss(f"chunk {whole.index}: {exc}") from exc
        if digest(raw) != whole.digest:
            raise DataLoss(
                f"chunk {whole.index} of window {self.window.name!r} does not match its "
                "digest; refusing to use it"
            )
        self.received += 1
        return ThawedChunk(
            index=whole.index,
            token_start=whole.token_start,
            token_count=whole.token_count,
            digest=whole.digest,
            data=raw,
        )

    def finish(self, expected: int) -> None:
        """Fail if the stream ended before every requested chunk arrived."""
        if self._assembler.in_progress:
            raise DataLoss("thaw stream ended in the middle of a chunk")
        if self.received != expected:
            raise DataLoss(f"thaw stream ended after {self.received} of {expected} chunks")


def expected_chunks(window: pb.WindowInfo, first_chunk: int, chunk_count: int) -> int:
    remaining = max(0, window.chunk_count - first_chunk)
    return remaining if chunk_count == 0 else min(chunk_count, remaining)


def list_request(
    *,
    page_size: int,
    page_token: str,
    name_prefix: str,
    session_id: str,
    model_id: str,
    tags: Mapping[str, str] | None,
    search: str,
    view: int,
) -> pb.ListWindowsRequest:
    return pb.ListWindowsRequest(
        page_size=page_size,
        page_token=page_token,
        name_prefix=name_prefix,
        session_id=session_id,
        model_id=model_id,
        tags=dict(tags or {}),
        search=search,
        view=view,  # type: ignore[arg-type]
    )
