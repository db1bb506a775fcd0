"""Reading a Thaw stream: the window info first, then chunk parts reassembled, decoded and
verified into `ThawedChunk`s. The blocking and asyncio thaw streams both read through this,
one decoder per stream."""

from __future__ import annotations

from cwm_client import pb
from cwm_client.buffers import BufferPool
from cwm_client.chunks import DTYPE_SIZE, ChunkAssembler
from cwm_client.errors import Aborted, DataLoss, InvalidArgument
from cwm_client.thawed import ThawedChunk, verified_chunk


class ThawDecoder:
    """Turns Thaw messages into a WindowInfo and verified ThawedChunks.

    The client verifies too: the manager already did, but bytes that crossed a network and
    two processes are only trusted once their digest is checked where they are used.
    """

    def __init__(self, reference: pb.WindowInfo | None = None) -> None:
        self.window: pb.WindowInfo | None = None
        # Chunks come one after another and the caller drops each before long: their
        # buffers are reused (no fresh pages per chunk).
        self._assembler = ChunkAssembler(max_encoded_size=1 << 40, pool=BufferPool(keep=8))
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
        chunk = verified_chunk(
            self.window.name,
            whole.index,
            whole.token_start,
            whole.token_count,
            whole.digest,
            whole.codec,
            whole.data,
            whole.raw_size,
            self._word,
        )
        self.received += 1
        return chunk

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
