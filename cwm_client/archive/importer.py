"""Importing an archive: `import_window` freezes the window it holds into a manager,
reading only the chunks the manager lacks, each verified before it is sent."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from cwm_client import pb
from cwm_client.archive.layout import iso_time
from cwm_client.archive.reader import ArchiveChunk, read_archive
from cwm_client.errors import CwmError, FailedPrecondition
from cwm_client.names import check_window_name
from cwm_client.windows.progress import Progress
from cwm_client.windows.sync_client import WindowClient


@dataclass(frozen=True)
class ImportResult:
    """What `import_window` committed and moved."""

    name: str
    source_name: str
    tokens: int
    chunks: int
    raw_bytes: int
    file: str
    chunks_sent: int
    chunks_reused: int
    bytes_sent: int
    window: pb.WindowInfo

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source_name": self.source_name,
            "tokens": self.tokens,
            "chunks": self.chunks,
            "raw_bytes": self.raw_bytes,
            "file": self.file,
            "chunks_sent": self.chunks_sent,
            "chunks_reused": self.chunks_reused,
            "bytes_sent": self.bytes_sent,
        }


def remaining_ttl(window: pb.WindowInfo, now: float | None = None) -> int:
    """Seconds left until the window expires (0: it never does)."""
    if not window.HasField("expires_at"):
        return 0
    expires = window.expires_at.seconds + window.expires_at.nanos / 1e9
    left = math.ceil(expires - (time.time() if now is None else now))
    if left <= 0:
        raise FailedPrecondition(
            f"window {window.name!r} in this archive expired at {iso_time(window.expires_at)}; "
            "give it a new lifetime (ttl_seconds, `--ttl SECONDS`, 0 = never) to import it"
        )
    return left


FIND_MISSING_BATCH = 10_000
"""Digests per FindMissingChunks call (the manager takes up to 100000)."""


class _DropRequestIteratorErrors(logging.Filter):
    """gRPC logs a traceback when a request iterator raises; the import reports the
    exception itself instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Exception iterating requests!"


@contextmanager
def _quiet_request_iterator_errors() -> Iterator[None]:
    logger = logging.getLogger("grpc._channel")
    quiet = _DropRequestIteratorErrors()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _verify_what_is_not_sent(client: WindowClient, chunks: Sequence[ArchiveChunk]) -> None:
    """Read and verify the archive's chunks that the manager already holds (the freeze
    reads, verifies and sends the others)."""
    missing: set[bytes] = set()
    digests = [c.digest for c in chunks]
    for start in range(0, len(digests), FIND_MISSING_BATCH):
        missing.update(client.find_missing(digests[start : start + FIND_MISSING_BATCH]))
    for chunk in chunks:
        if chunk.digest not in missing:
            chunk.data()  # DataLoss if the archive's copy is damaged


def import_window(
    client: WindowClient,
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
    replace: bool = False,
    ttl_seconds: int | None = None,
    progress: Progress | None = None,
    transport: str = "auto",
) -> ImportResult:
    """Freeze the window stored in the archive at `path`, as `name` if given.

    The window keeps its token ids, fingerprint, chunking, session id, cache salt, parent,
    tags, description, pin and remaining lifetime (`ttl_seconds` overrides the lifetime;
    0 means never expire). Every chunk of the archive is read and verified: the ones the
    manager lacks as they are sent, the others first (a damaged archive is refused even
    where the manager would not need its bytes). A corrupt chunk raises DataLoss and
    nothing is committed. Chunks the manager holds only in quarantine (found corrupt
    there) count as lacking: importing the archive repairs them.
    """
    with read_archive(path) as archive:
        window = archive.window
        target = check_window_name(name or window.name)
        ttl = remaining_ttl(window) if ttl_seconds is None else ttl_seconds
        _verify_what_is_not_sent(client, archive.chunks)
        with _quiet_request_iterator_errors():
            try:
                result = client.freeze(
                    target,
                    archive.chunks,
                    fingerprint=window.fingerprint,
                    token_ids=window.token_ids,
                    chunk_tokens=window.chunk_tokens,
                    session_id=window.session_id,
                    cache_salt=window.cache_salt,
                    parent=window.parent,
                    tags=dict(window.tags),
                    description=window.description,
                    ttl_seconds=ttl,
                    pinned=window.pinned,
                    replace=replace,
                    progress=progress,
                    transport=transport,
                )
            except CwmError:
                if archive.failure is not None:
                    raise archive.failure from None
                raise
        if archive.failure is not None:  # pragma: no cover - the freeze cannot succeed then
            raise archive.failure
    return ImportResult(
        name=result.window.name,
        source_name=window.name,
        tokens=result.window.token_count,
        chunks=result.window.chunk_count,
        raw_bytes=result.window.raw_bytes,
        file=str(path),
        chunks_sent=result.chunks_sent,
        chunks_reused=result.chunks_reused,
        bytes_sent=result.bytes_sent,
        window=result.window,
    )
