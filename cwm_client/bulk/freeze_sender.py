"""Sending a freeze's staging share on its bulk connection, and reading the manager's
result: each chunk is a frame head and its bytes (`sendall` straight from the chunk's own
buffer, no parts), then the end frame; the manager answers once it stored (or refused)
them all. On shared memory each chunk goes in a sealed file of its own instead
(`cwm_client.bulk.shm`), at most `shm.IN_FLIGHT` of them unacknowledged."""

from __future__ import annotations

import contextlib
import select
import socket
from collections.abc import Sequence

from google.rpc import status_pb2

from cwm_client import pb
from cwm_client.bulk import shm
from cwm_client.bulk.connection import connect
from cwm_client.bulk.frames import (
    BulkProtocolError,
    BulkResult,
    chunk_head,
    end_frame,
    read_result,
)
from cwm_client.channels import Credentials
from cwm_client.chunks import DTYPE_SIZE, ChunkPayload
from cwm_client.codecs import CODECS, RAW
from cwm_client.errors import InvalidArgument, Unavailable, from_status
from cwm_client.windows.freeze_stream import FreezePlan, wire_bytes
from cwm_client.windows.progress import Progress


def send_plan(
    offer: pb.BulkOffer,
    target: str,
    credentials: Credentials,
    plan: FreezePlan,
    progress: Progress | None,
    wire_codec: int = RAW,
) -> BulkResult | None:
    """Connect to the offer and stage the plan's chunks there (`send_share`); None when the
    connection cannot be opened (nothing was sent: freeze over gRPC instead)."""
    try:
        sock = connect(offer, target, credentials)
    except OSError:
        return None
    with contextlib.closing(sock):
        word = DTYPE_SIZE.get(plan.header.fingerprint.kv_dtype, 1)
        shared_memory = offer.transport == pb.BulkTransport.BULK_TRANSPORT_SHM
        return send_share(sock, plan.to_send, word, progress, wire_codec, shared_memory)


def send_share(
    sock: socket.socket,
    to_send: Sequence[ChunkPayload],
    word: int,
    progress: Progress | None,
    wire_codec: int = RAW,
    shared_memory: bool = False,
) -> BulkResult:
    """Send `to_send` in order and return the manager's result (its error raised as the
    `cwm_client.errors` class of its status code). A connection lost mid-transfer (the
    manager stopped, the network went) is UNAVAILABLE (`BULK_CONNECTION_LOST`): nothing was
    committed, the freeze can be run again."""
    if wire_codec not in CODECS:
        raise InvalidArgument(f"unknown wire codec {wire_codec}", field="wire_codec")
    try:
        return _send(sock, to_send, word, progress, (wire_codec,), shared_memory)
    except (OSError, BulkProtocolError) as exc:
        raise Unavailable(
            f"the bulk connection to the manager was lost mid-freeze ({exc}); nothing was "
            "committed: freeze again",
            reason="BULK_CONNECTION_LOST",
        ) from None


def _send(
    sock: socket.socket,
    to_send: Sequence[ChunkPayload],
    word: int,
    progress: Progress | None,
    accepted: tuple[int, ...],
    shared_memory: bool,
) -> BulkResult:
    total = sum(c.raw_size for c in to_send)
    files = shm.ShmSender(sock) if shared_memory else None
    done = 0
    if progress is not None:
        progress(0, total)
    try:
        for chunk in to_send:
            codec, encoded = wire_bytes(chunk, accepted, word)
            head = chunk_head(chunk.index, codec, chunk.raw_size, len(encoded))
            if files is not None:
                files.send(head, encoded)
            else:
                sock.sendall(head)
                sock.sendall(encoded)
            del encoded
            if files.poll() if files is not None else _answered(sock):
                # The manager refused something and stopped: why?
                raise_for(read_result(sock))
                raise InvalidArgument("the manager ended the bulk freeze before its end frame")
            done += chunk.raw_size
            if progress is not None:
                progress(done, total)
        sock.sendall(end_frame())
        if files is not None:
            files.wait_answer()
    except OSError:
        if files is not None and not files.answered:
            raise
        raise_for(read_result(sock))  # the manager may have refused a chunk and closed
        raise
    result = read_result(sock)
    raise_for(result)
    return result


def _answered(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def raise_for(result: BulkResult) -> None:
    if result.code == 0:
        return
    status = status_pb2.Status.FromString(result.status) if result.status else None
    if status is None:
        status = status_pb2.Status(code=result.code, message="the bulk freeze failed")
    raise from_status(status)
