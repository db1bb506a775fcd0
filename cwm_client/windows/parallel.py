"""Splitting one freeze or thaw over several streams: how many, and what each one carries.

A parallel freeze stages a share of the chunks per stream under one upload id and commits
with a last header-only stream; a parallel thaw reads a stripe of the chunks per stream.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from cwm_client import pb
from cwm_client.errors import InvalidArgument
from cwm_client.messages import build
from cwm_client.windows.thaw_decoder import expected_chunks

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


def thaw_streams(
    window: pb.WindowInfo, first_chunk: int, chunk_count: int, requested: int | None
) -> int:
    """How many streams a thaw of this range of `window` (BASIC view is enough) uses."""
    span = expected_chunks(window, first_chunk, chunk_count)
    share = window.raw_bytes * span // max(1, window.chunk_count)
    return auto_streams(share, span, requested)


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
            build(
                pb.ThawRequest,
                name=name,
                first_chunk=first_chunk + i,
                chunk_count=0 if chunk_count == 0 else max(0, chunk_count - i),
                chunk_stride=streams,
                accept_codecs=accept_codecs,
                window_view=(
                    pb.WindowView.WINDOW_VIEW_FULL if i == 0 else pb.WindowView.WINDOW_VIEW_BASIC
                ),
            )
            for i in range(streams)
        ]
        return StripedThaw(requests)
