"""Uploads: the state that lets several Freeze streams build one window (parallel freeze).

Streams whose header carries the same `upload_id` with `stage_only` store their share of the
chunks and end without committing; what they stored is recorded here, pinned so no delete
or clean-up collects it. A last stream with the same `upload_id` and `stage_only` unset
commits the window in one catalog transaction, counting the staged chunks as its own, and
closes the upload. Nothing is visible before that commit; an upload that is never committed
is closed after `upload_ttl_s` without any stream and its staged chunks are collected (a
restart collects them too, as chunk files without a catalog row).

Everything here runs on the manager's event loop thread.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import blake3
import structlog

from cwm_client import pb
from cwm_client.errors import FailedPrecondition, InvalidArgument
from cwm_server.manager.catalog.base import NewChunk

log = structlog.get_logger("cwm.uploads")

UPLOAD_ID = re.compile(r"[A-Za-z0-9._-]{8,64}")


def check_upload(header: pb.FreezeHeader) -> None:
    """INVALID_ARGUMENT unless the header's upload fields make sense."""
    if header.upload_id and not UPLOAD_ID.fullmatch(header.upload_id):
        raise InvalidArgument(
            f"upload_id {header.upload_id!r} must be 8 to 64 characters of [A-Za-z0-9._-]",
            field="upload_id",
        )
    if header.stage_only and not header.upload_id:
        raise InvalidArgument(
            "stage_only needs an upload_id: staged chunks are committed by a later stream "
            "of the same upload",
            field="stage_only",
        )


def header_key(header: pb.FreezeHeader) -> bytes:
    """What every stream of one upload must agree on: the window's name, model, chunking
    and chunk digests."""
    hasher = blake3.blake3()
    hasher.update(header.name.encode())
    hasher.update(header.fingerprint.SerializeToString(deterministic=True))
    hasher.update(header.chunk_tokens.to_bytes(4, "little"))
    hasher.update(len(header.token_ids).to_bytes(8, "little"))
    for chunk_digest in header.chunk_digests:
        hasher.update(chunk_digest)
    digest: bytes = hasher.digest()
    return digest


@dataclass
class Upload:
    tenant: str
    upload_id: str
    key: bytes
    chunks: dict[bytes, NewChunk] = field(default_factory=dict)
    leftovers: set[bytes] = field(default_factory=set)
    """Chunks that failed streams of the upload wrote and could not collect (the upload's
    other streams pinned them): collected when the upload closes."""
    pins: list[tuple[str, bytes]] = field(default_factory=list)
    streams: int = 0
    """Streams of this upload running now."""
    closed: bool = False
    timer: asyncio.TimerHandle | None = None


class Uploads:
    """The open uploads of every tenant, keyed by (tenant, upload_id)."""

    def __init__(
        self,
        ttl_s: float,
        pin: Callable[[str, Iterable[bytes]], list[tuple[str, bytes]]],
        unpin: Callable[[Iterable[tuple[str, bytes]]], None],
        collect: Callable[[str, Iterable[bytes]], Awaitable[int]],
    ) -> None:
        self._ttl_s = ttl_s
        self._pin = pin
        self._unpin = unpin
        self._collect = collect
        self._open: dict[tuple[str, str], Upload] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._open)

    def join(self, tenant: str, header: pb.FreezeHeader) -> Upload:
        """A stream of upload `header.upload_id` starts: the upload, made if new."""
        key = header_key(header)
        upload = self._open.get((tenant, header.upload_id))
        if upload is None:
            # A commit of an upload nobody staged into (or that expired) may still succeed
            # when every chunk is stored already; the commit says what is missing if not.
            upload = Upload(tenant, header.upload_id, key)
            self._open[(tenant, header.upload_id)] = upload
        elif upload.key != key:
            raise InvalidArgument(
                f"upload {header.upload_id!r} belongs to another window (name, model, "
                "chunking or chunk digests differ); use a fresh upload_id per window",
                field="upload_id",
            )
        upload.streams += 1
        if upload.timer is not None:
            upload.timer.cancel()
            upload.timer = None
        return upload

    def stage(self, upload: Upload, chunks: dict[bytes, NewChunk]) -> None:
        """A stage_only stream of `upload` stored `chunks`: keep them for the commit."""
        if upload.closed:
            raise FailedPrecondition(
                f"upload {upload.upload_id!r} was committed or expired while this stream "
                "staged chunks into it; start a new upload",
                reason="UPLOAD_CLOSED",
                field="upload_id",
            )
        fresh = [d for d in chunks if d not in upload.chunks]
        upload.pins.extend(self._pin(upload.tenant, fresh))
        upload.chunks.update(chunks)

    def add_leftovers(self, upload: Upload, digests: Iterable[bytes]) -> None:
        """A failed stream of `upload` wrote `digests`: collect them when the upload closes
        (or now, if it is closed already)."""
        if upload.closed:
            self._collect_later(upload.tenant, list(digests))
        else:
            upload.leftovers.update(digests)

    def leave(self, upload: Upload, *, close: bool, committed: bool = False) -> None:
        """A stream of `upload` ended; `close` (the commit stream, `committed` or not) ends
        the upload. After a commit every staged chunk has its catalog row: nothing to
        collect."""
        upload.streams -= 1
        if upload.closed:
            return
        if close:
            if committed:
                upload.chunks.clear()
            self._close(upload, "committed" if committed else "commit failed")
        elif upload.streams <= 0:
            loop = asyncio.get_running_loop()
            upload.timer = loop.call_later(self._ttl_s, self._close, upload, "expired")

    def close_all(self) -> None:
        for upload in list(self._open.values()):
            if upload.timer is not None:
                upload.timer.cancel()
            upload.closed = True
        self._open.clear()

    def _close(self, upload: Upload, why: str) -> None:
        """Unpin the staged chunks and collect those no window took."""
        if upload.closed:
            return
        upload.closed = True
        if upload.timer is not None:
            upload.timer.cancel()
            upload.timer = None
        self._open.pop((upload.tenant, upload.upload_id), None)
        self._unpin(upload.pins)
        upload.pins = []
        staged = list(upload.chunks)
        if why != "committed" or staged:
            log.info(
                "upload_closed",
                tenant=upload.tenant,
                upload=upload.upload_id,
                why=why,
                staged=len(staged),
            )
        self._collect_later(upload.tenant, [*staged, *upload.leftovers])
        upload.leftovers = set()

    def _collect_later(self, tenant: str, digests: list[bytes]) -> None:
        if not digests:
            return
        task = asyncio.ensure_future(self._collect_quietly(tenant, digests))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _collect_quietly(self, tenant: str, digests: list[bytes]) -> None:
        try:
            await self._collect(tenant, digests)
        except Exception:  # noqa: BLE001 - start-up recovery collects whatever is left
            log.warning("upload_collect_failed", tenant=tenant, chunks=len(digests))

    async def drain(self) -> None:
        """Wait for the clean-ups of closed uploads (tests, shutdown)."""
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)
