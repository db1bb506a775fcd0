"""Logic shared by the sync and asyncio clients: building freeze streams and decoding thaw
streams. The two client modules only differ in how they wait.

Channel defaults and credentials live in the public `cwm_client.channels`; they are
re-exported here for code that still imports them from this module."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from cwm_client import pb
from cwm_client.channels import AUTHORIZATION_KEY as AUTHORIZATION_KEY
from cwm_client.channels import CHANNEL_OPTIONS as CHANNEL_OPTIONS
from cwm_client.channels import DEFAULT_TARGET as DEFAULT_TARGET
from cwm_client.channels import EXTRA_CHANNEL_OPTIONS as EXTRA_CHANNEL_OPTIONS
from cwm_client.channels import MAX_MESSAGE_BYTES as MAX_MESSAGE_BYTES
from cwm_client.channels import Credentials as Credentials
from cwm_client.channels import resolve_credentials as resolve_credentials
from cwm_client.chunks import (
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_PART_BYTES,
    DTYPE_SIZE,
    ChunkAssembler,
    ChunkPayload,
    digest,
    fill_parts,
)
from cwm_client.codecs import CODECS, RAW, decode, encode_for_wire
from cwm_client.errors import Aborted, DataLoss, InvalidArgument

MAX_AUTO_STREAMS = 4
PARALLEL_MIN_BYTES = 64 << 20
"""Below this a freeze or thaw uses one stream: a second one costs a round trip and, on a
small transfer, saves less than that."""
BYTES_PER_STREAM = 64 << 20
"""Auto mode adds a stream per this many bytes, up to MAX_AUTO_STREAMS and half the
client's CPU count."""
CORES_PER_STREAM = 2
"""Each stream keeps about one core busy on each side (the client verifying, the manager
reading and sending), so auto mode opens one stream per two client cores: on a 2-core
machine one stream was faster than two or four (docs/BENCHMARKS.md), the extra streams only
adding context switches between threads that share the cores."""

Progress = Callable[[int, int], None]
"""Called with (bytes_done, bytes_total) as a freeze or thaw moves chunk bytes."""


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


def auto_streams(total_bytes: int, chunk_count: int, requested: int | None) -> int:
    """How many streams move `total_bytes` in `chunk_count` chunks.

    `requested` (when not None) wins, bounded by the chunk count; otherwise one stream below
    PARALLEL_MIN_BYTES and one per BYTES_PER_STREAM above it, up to MAX_AUTO_STREAMS and one
    per CORES_PER_STREAM client cores.
    """
    if requested is not None:
        if requested < 1:
            raise InvalidArgument(f"streams must be at least 1, got {requested}", field="streams")
        return max(1, min(requested, chunk_count))
    if total_bytes < PARALLEL_MIN_BYTES or chunk_count < 2:
        return 1
    by_cores = (os.cpu_count() or 1) // CORES_PER_STREAM
    wanted = max(2, total_bytes // BYTES_PER_STREAM)
    return int(max(1, min(wanted, MAX_AUTO_STREAMS, by_cores, chunk_count)))


def new_upload_id() -> str:
    """A fresh id for the streams of one parallel freeze."""
    return f"up-{uuid.uuid4().hex}"


def stage_header(header: pb.FreezeHeader, upload_id: str, stage_only: bool) -> pb.FreezeHeader:
    """A copy of `header` for one stream of a parallel freeze."""
    staged = pb.FreezeHeader()
    staged.CopyFrom(header)
    staged.upload_id = upload_id
    staged.stage_only = stage_only
    return staged


class ProgressSum:
    """Adds up the progress of several streams into one callback (thread-safe)."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self._progress = progress
        self._total = total
        self._done = 0
        self._lock = threading.Lock()

    def stream(self) -> Progress | None:
        if self._progress is None:
            return None
        last = [0]

        def report(done: int, total: int) -> None:
            del total
            with self._lock:
                self._done += done - last[0]
                last[0] = done
                done_all = self._done
            assert self._progress is not None
            self._progress(done_all, self._total)

        return report


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
        raw = chunk.data()
        if len(raw) != chunk.raw_size:
            raise InvalidArgument(
                f"chunk {chunk.index}: data() returned {len(raw)} bytes, raw_size says "
                f"{chunk.raw_size}"
            )
        codec, encoded = (RAW, raw) if wire_codec == RAW else encode_for_wire(raw, accepted, word)
        yield from fill_parts(_freeze_request, chunk, encoded, codec, part_bytes)
        del raw, encoded
        done += chunk.raw_size
        if progress is not None:
            progress(done, total)


class ThawDecoder:
    """Turns Thaw messages into a WindowInfo and verified ThawedChunks.

    The client verifies too: the manager already did, but bytes that crossed a network and
    two processes are only trusted once their digest is checked where they are used.
    """

    def __init__(self, reference: pb.WindowInfo | None = None) -> None:
        self.window: pb.WindowInfo | None = None
        self._assembler = ChunkAssembler(max_encoded_size=1 << 40)
        self._word = 2
        self.received = 0
        self.encoded_bytes = 0
        self._reference = reference
        """For the extra streams of a parallel thaw: the window (FULL view) the first
        stream described; every chunk must be the one it lists at that index."""

    def accept(self, message: pb.ThawResponse) -> ThawedChunk | None:
        kind = message.WhichOneof("payload")
        if kind == "window":
            self.window = message.window
            self._word = DTYPE_SIZE.get(message.window.fingerprint.kv_dtype, 1)
            if self._reference is not None:
                _check_same_window(self._reference, self.window)
            return None
        if kind != "chunk" or self.window is None:
            raise DataLoss("thaw stream is malformed: chunk before window info")
        try:
            whole = self._assembler.add(message.chunk)
        except InvalidArgument as exc:
            raise DataLoss(f"thaw stream is malformed: {exc.message}") from exc
        if whole is None:
            return None
        self.encoded_bytes += len(whole.data)
        if self._reference is not None:
            refs = self._reference.chunks
            if whole.index >= len(refs) or refs[whole.index].digest != whole.digest:
                raise Aborted(
                    f"window {self._reference.name!r} was replaced while it was being thawed "
                    f"(chunk {whole.index} differs between its streams); thaw it again",
                    reason="WINDOW_CHANGED",
                )
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


def _check_same_window(first: pb.WindowInfo, other: pb.WindowInfo) -> None:
    if (
        other.name != first.name
        or other.chunk_count != first.chunk_count
        or other.raw_bytes != first.raw_bytes
        or other.created_at != first.created_at
    ):
        raise Aborted(
            f"window {first.name!r} was replaced while it was being thawed (its streams "
            "describe different windows); thaw it again",
            reason="WINDOW_CHANGED",
        )


def expected_chunks(
    window: pb.WindowInfo, first_chunk: int, chunk_count: int, stride: int = 1
) -> int:
    """Chunks a Thaw of this range sends: every `stride`-th from `first_chunk` on."""
    remaining = max(0, window.chunk_count - first_chunk)
    span = remaining if chunk_count == 0 else min(chunk_count, remaining)
    stride = max(1, stride)
    return (span + stride - 1) // stride


@dataclass(frozen=True)
class StripedThaw:
    """The N requests that read chunks [first_chunk, end) of a window over N streams: stream
    i sends chunks first_chunk + i, first_chunk + i + N, ... so the k-th chunk in order is
    the (k // N)-th of stream k % N. The first stream asks for the FULL window, the others
    for BASIC."""

    requests: list[pb.ThawRequest]

    @staticmethod
    def plan(
        name: str,
        first_chunk: int,
        chunk_count: int,
        streams: int,
        accept_codecs: Sequence[int] = (),
    ) -> StripedThaw:
        requests = [
            pb.ThawRequest(
                name=name,
                first_chunk=first_chunk + i,
                chunk_count=0 if chunk_count == 0 else max(0, chunk_count - i),
                chunk_stride=streams,
                accept_codecs=accept_codecs,  # type: ignore[arg-type]
                window_view=(
                    pb.WindowView.WINDOW_VIEW_FULL if i == 0 else pb.WindowView.WINDOW_VIEW_BASIC
                ),
            )
            for i in range(streams)
        ]
        return StripedThaw(requests)


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
