"""Writing an archive: `export_window` thaws a window into one, a chunk at a time, and
`write_archive` writes any window and chunk stream as one, checking each chunk first."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cwm_client import pb
from cwm_client.archive.layout import (
    MANIFEST_JSON,
    MANIFEST_PB,
    chunk_member_name,
    manifest_summary,
    short_digest,
)
from cwm_client.chunks import digest as blake3_digest
from cwm_client.errors import AlreadyExists, DataLoss, InvalidArgument
from cwm_client.names import check_window_name
from cwm_client.thawed import ThawedChunk
from cwm_client.windows.progress import Progress
from cwm_client.windows.sync_client import WindowClient


@dataclass(frozen=True)
class ArchiveStats:
    """What `write_archive` put in the tar."""

    chunks: int
    raw_bytes: int


def _member(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o644
    info.type = tarfile.REGTYPE
    return info


def write_archive(
    fileobj: BinaryIO,
    window: pb.WindowInfo,
    chunks: Iterable[ThawedChunk],
    *,
    progress: Progress | None = None,
) -> ArchiveStats:
    """Write `window` (FULL view) and its chunks, in index order, as an archive to `fileobj`.

    Each chunk is checked against the window's chunk refs (index, size, BLAKE3 digest)
    before it is written, so an archive never holds bytes that do not match its manifest.
    Only one chunk is in memory at a time. `progress` gets (raw bytes done, raw bytes total).
    """
    if not window.chunks or len(window.chunks) != window.chunk_count:
        raise InvalidArgument(
            f"window {window.name!r} lists {len(window.chunks)} chunk refs but has "
            f"{window.chunk_count} chunks: an archive needs the FULL view"
        )
    if len(window.token_ids) != window.token_count:
        raise InvalidArgument(
            f"window {window.name!r} lists {len(window.token_ids)} token ids but has "
            f"{window.token_count} tokens: an archive needs the FULL view"
        )
    mtime = window.created_at.seconds if window.HasField("created_at") else 0
    manifest = window.SerializeToString(deterministic=True)
    summary = (
        json.dumps(manifest_summary(window, blake3_digest(manifest)), indent=2, sort_keys=True)
        + "\n"
    ).encode()
    total = sum(ref.raw_size for ref in window.chunks)
    done = 0
    count = 0
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_member(MANIFEST_PB, len(manifest), mtime), io.BytesIO(manifest))
        tar.addfile(_member(MANIFEST_JSON, len(summary), mtime), io.BytesIO(summary))
        if progress is not None:
            progress(0, total)
        for chunk in chunks:
            if count >= len(window.chunks):
                raise DataLoss(f"got a chunk {chunk.index} past the window's last chunk")
            ref = window.chunks[count]
            if chunk.index != ref.index or chunk.digest != ref.digest:
                raise DataLoss(
                    f"expected chunk {ref.index} ({short_digest(ref.digest)}), got chunk "
                    f"{chunk.index} ({short_digest(chunk.digest)})"
                )
            if len(chunk.data) != ref.raw_size or blake3_digest(chunk.data) != ref.digest:
                raise DataLoss(
                    f"chunk {ref.index} of window {window.name!r} does not match its digest "
                    f"{short_digest(ref.digest)}; refusing to archive it"
                )
            name = chunk_member_name(ref.index, ref.digest)
            tar.addfile(_member(name, len(chunk.data), mtime), io.BytesIO(chunk.data))
            count += 1
            done += len(chunk.data)
            if progress is not None:
                progress(done, total)
    if count != len(window.chunks):
        raise DataLoss(
            f"window {window.name!r}: got {count} of {len(window.chunks)} chunks; the archive "
            "is incomplete"
        )
    return ArchiveStats(chunks=count, raw_bytes=done)


@dataclass(frozen=True)
class ExportResult:
    """What `export_window` wrote."""

    name: str
    tokens: int
    chunks: int
    raw_bytes: int
    file: str
    bytes_written: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tokens": self.tokens,
            "chunks": self.chunks,
            "raw_bytes": self.raw_bytes,
            "file": self.file,
            "bytes_written": self.bytes_written,
        }


def export_window(
    client: WindowClient,
    name: str,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    transport: str = "auto",
) -> ExportResult:
    """Thaw window `name` and write it as an archive at `path`.

    The archive is written to a temporary file beside `path`, fsynced, and renamed into
    place, so `path` is either the complete archive or untouched.
    """
    check_window_name(name)
    dest = Path(path)
    if dest.exists() and not overwrite:
        raise AlreadyExists(
            f"{dest} exists; choose another file or overwrite it (`cwm export --force`, "
            "`overwrite=True` in the SDK)"
        )
    with client.thaw(name, transport=transport) as stream:
        window = stream.window
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
        try:
            with open(tmp, "wb") as handle:
                stats = write_archive(handle, window, stream, progress=progress)
                handle.flush()
                os.fsync(handle.fileno())
                written = handle.tell()
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return ExportResult(
        name=window.name,
        tokens=window.token_count,
        chunks=stats.chunks,
        raw_bytes=stats.raw_bytes,
        file=str(dest),
        bytes_written=written,
    )
