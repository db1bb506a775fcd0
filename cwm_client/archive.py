"""Portable single-file window archives (`cwm export` / `cwm import`).

An archive is a plain, uncompressed POSIX tar holding, in this order:

- ``manifest.pb``: the window's `pb.WindowInfo`, FULL view (token ids and chunk refs);
- ``manifest.json``: format name and version, the BLAKE3 of ``manifest.pb`` and a
  human-readable summary of the window;
- ``chunks/<index:06d>-<digest hex>.bin``: the raw canonical bytes of every chunk, in index
  order.

Nothing is held whole in memory: export writes one thawed chunk at a time, import reads a
chunk from the tar only when the freeze stream sends it (chunks the manager already holds
are never read) and checks its BLAKE3 digest before a byte of it leaves the process. A
damaged archive raises `DataLoss` naming the chunk, and the freeze is abandoned, so the
manager commits nothing.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tarfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from cwm_client import pb
from cwm_client._common import Progress, ThawedChunk
from cwm_client.chunks import digest as blake3_digest
from cwm_client.errors import (
    AlreadyExists,
    CwmError,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
)
from cwm_client.names import check_window_name
from cwm_client.sync_client import WindowClient

FORMAT = "cwm-window-archive"
FORMAT_VERSION = 1
MANIFEST_PB = "manifest.pb"
MANIFEST_JSON = "manifest.json"
CHUNK_DIR = "chunks"
MAX_MANIFEST_BYTES = 256 << 20
"""Refuse a manifest larger than this (16M token ids take ~80 MiB of protobuf)."""


def chunk_member_name(index: int, digest: bytes) -> str:
    """The tar member that holds chunk `index` with this digest."""
    return f"{CHUNK_DIR}/{index:06d}-{digest.hex()}.bin"


def _short(digest: bytes) -> str:
    return digest.hex()[:16] + "…"


def _iso(stamp: Timestamp) -> str:
    return datetime.fromtimestamp(stamp.seconds + stamp.nanos / 1e9, UTC).isoformat()


def manifest_summary(window: pb.WindowInfo, manifest_digest: bytes) -> dict[str, Any]:
    """The content of ``manifest.json``: the format and a summary for people and scripts."""
    fp = window.fingerprint
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "manifest": MANIFEST_PB,
        "manifest_blake3": manifest_digest.hex(),
        "chunk_members": f"{CHUNK_DIR}/<index:06d>-<blake3 hex>.bin",
        "name": window.name,
        "tenant": window.tenant,
        "session_id": window.session_id,
        "tokens": window.token_count,
        "chunks": window.chunk_count,
        "chunk_tokens": window.chunk_tokens,
        "raw_bytes": window.raw_bytes,
        "parent": window.parent,
        "tags": dict(window.tags),
        "description": window.description,
        "created_at": _iso(window.created_at) if window.HasField("created_at") else None,
        "expires_at": _iso(window.expires_at) if window.HasField("expires_at") else None,
        "pinned": window.pinned,
        "model": {
            "model_id": fp.model_id,
            "weights_digest": fp.weights_digest,
            "tokenizer_digest": fp.tokenizer_digest,
            "kv_dtype": pb.KvDtype.Name(fp.kv_dtype),
            "num_layers": fp.num_layers,
            "num_kv_heads": fp.num_kv_heads,
            "head_dim": fp.head_dim,
            "block_size": fp.block_size,
            "engine": fp.engine_name,
            "engine_version": fp.engine_version,
        },
    }


# -- writing ---------------------------------------------------------------------------------


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
                    f"expected chunk {ref.index} ({_short(ref.digest)}), got chunk "
                    f"{chunk.index} ({_short(chunk.digest)})"
                )
            if len(chunk.data) != ref.raw_size or blake3_digest(chunk.data) != ref.digest:
                raise DataLoss(
                    f"chunk {ref.index} of window {window.name!r} does not match its digest "
                    f"{_short(ref.digest)}; refusing to archive it"
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
) -> ExportResult:
    """Thaw window `name` and write it as an archive at `path`.

    The archive is written to a temporary file beside `path`, fsynced, and renamed into
    place, so `path` is either the complete archive or untouched.
    """
    check_window_name(name)
    dest = Path(path)
    if dest.exists() and not overwrite:
        raise AlreadyExists(f"{dest} exists; choose another file or allow overwriting it")
    with client.thaw(name) as stream:
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


# -- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveChunk:
    """One chunk of an archive: its identity from the manifest, its bytes read on demand.

    Implements `cwm_client.chunks.ChunkPayload`, so a freeze reads (and verifies) only the
    chunks it actually sends.
    """

    index: int
    token_start: int
    token_count: int
    digest: bytes
    raw_size: int
    reader: ArchiveReader = field(repr=False, compare=False)

    def data(self) -> bytes:
        return self.reader.read_chunk(self.index)


class ArchiveReader:
    """An open archive: `window` (from ``manifest.pb``), `summary` (``manifest.json``) and
    `chunks` (lazy `ArchiveChunk`s). Use as a context manager, or call `close`.

    Opening reads the tar's member headers (not the chunk bytes) and checks the archive's
    structure: format and version, the manifest's digest, and one member of the right size
    per chunk. `read_chunk` verifies the BLAKE3 digest of every chunk it returns.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.failure: DataLoss | None = None
        """The first DataLoss `read_chunk` raised, kept for callers whose reads happen on
        another thread (the gRPC request iterator) where the exception itself is lost."""
        self._file: BinaryIO = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        try:
            self._tar = tarfile.open(fileobj=self._file, mode="r:*")  # noqa: SIM115
            self._members = {m.name: m for m in self._tar.getmembers()}
            self.summary = self._read_summary()
            self.window = self._read_manifest()
            self.chunks = self._index_chunks()
        except BaseException:
            self.close()
            raise

    def _not_archive(self, why: str) -> InvalidArgument:
        return InvalidArgument(f"{self.path} is not a cwm window archive: {why}")

    def _read_member(self, name: str, limit: int) -> bytes:
        member = self._members.get(name)
        if member is None:
            raise self._not_archive(f"it has no {name}")
        if not member.isfile():
            raise self._not_archive(f"{name} is not a regular file")
        if member.size > limit:
            raise self._not_archive(f"{name} is {member.size} bytes (limit {limit})")
        handle = self._tar.extractfile(member)
        assert handle is not None
        try:
            data = handle.read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataLoss(f"{self.path}: {name} cannot be read ({exc})") from None
        if len(data) != member.size:
            raise DataLoss(f"{self.path}: {name} is truncated")
        return data

    def _read_summary(self) -> dict[str, Any]:
        raw = self._read_member(MANIFEST_JSON, 16 << 20)
        try:
            summary = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataLoss(f"{self.path}: {MANIFEST_JSON} is not valid JSON ({exc})") from None
        if not isinstance(summary, dict) or summary.get("format") != FORMAT:
            raise self._not_archive(f"{MANIFEST_JSON} does not name the format {FORMAT!r}")
        version = summary.get("version")
        if not isinstance(version, int) or version < 1 or version > FORMAT_VERSION:
            raise FailedPrecondition(
                f"{self.path} is a version {version!r} archive; this cwm reads versions "
                f"1..{FORMAT_VERSION}: upgrade cwm to import it"
            )
        return summary

    def _read_manifest(self) -> pb.WindowInfo:
        raw = self._read_member(MANIFEST_PB, MAX_MANIFEST_BYTES)
        expected = self.summary.get("manifest_blake3")
        if expected != blake3_digest(raw).hex():
            raise DataLoss(
                f"{self.path}: {MANIFEST_PB} does not match the BLAKE3 digest recorded in "
                f"{MANIFEST_JSON}; the archive is corrupt"
            )
        try:
            window = pb.WindowInfo.FromString(raw)
        except DecodeError as exc:
            raise DataLoss(f"{self.path}: {MANIFEST_PB} cannot be parsed ({exc})") from None
        if len(window.token_ids) != window.token_count or window.token_count == 0:
            raise DataLoss(
                f"{self.path}: the manifest lists {len(window.token_ids)} token ids for "
                f"{window.token_count} tokens"
            )
        if len(window.chunks) != window.chunk_count or window.chunk_count == 0:
            raise DataLoss(
                f"{self.path}: the manifest lists {len(window.chunks)} chunk refs for "
                f"{window.chunk_count} chunks"
            )
        return window

    def _index_chunks(self) -> list[ArchiveChunk]:
        chunks: list[ArchiveChunk] = []
        self._chunk_members: list[tarfile.TarInfo] = []
        for position, ref in enumerate(self.window.chunks):
            if ref.index != position:
                raise DataLoss(
                    f"{self.path}: manifest chunk ref {position} says it is chunk {ref.index}"
                )
            name = chunk_member_name(ref.index, ref.digest)
            member = self._members.get(name)
            if member is None or not member.isfile():
                raise DataLoss(f"{self.path}: chunk {ref.index} ({name}) is missing")
            if member.size != ref.raw_size:
                raise DataLoss(
                    f"{self.path}: chunk {ref.index} ({_short(ref.digest)}) is {member.size} "
                    f"bytes, the manifest says {ref.raw_size}"
                )
            self._chunk_members.append(member)
            chunks.append(
                ArchiveChunk(
                    index=ref.index,
                    token_start=ref.token_start,
                    token_count=ref.token_count,
                    digest=ref.digest,
                    raw_size=ref.raw_size,
                    reader=self,
                )
            )
        return chunks

    def read_chunk(self, index: int) -> bytes:
        """The raw bytes of chunk `index`, verified; DataLoss naming the chunk if they are
        unreadable or do not match its digest."""
        try:
            ref = self.window.chunks[index]
            member = self._chunk_members[index]
            handle = self._tar.extractfile(member)
            assert handle is not None
            try:
                data = handle.read()
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise DataLoss(
                    f"{self.path}: chunk {index} ({_short(ref.digest)}) cannot be read ({exc})"
                ) from None
            if len(data) != ref.raw_size:
                raise DataLoss(
                    f"{self.path}: chunk {index} ({_short(ref.digest)}) is truncated: "
                    f"{len(data)} of {ref.raw_size} bytes"
                )
            if blake3_digest(data) != ref.digest:
                raise DataLoss(
                    f"{self.path}: chunk {index} ({_short(ref.digest)}) does not match its "
                    "BLAKE3 digest; the archive is corrupt",
                    reason="DIGEST_MISMATCH",
                    metadata={"chunk_index": str(index)},
                )
        except DataLoss as exc:
            if self.failure is None:
                self.failure = exc
            raise
        return data

    def verify(self, progress: Progress | None = None) -> None:
        """Read and verify every chunk (import only reads the chunks it sends)."""
        total = sum(c.raw_size for c in self.chunks)
        done = 0
        for chunk in self.chunks:
            done += len(self.read_chunk(chunk.index))
            if progress is not None:
                progress(done, total)

    def close(self) -> None:
        tar = getattr(self, "_tar", None)
        if tar is not None:
            tar.close()
        self._file.close()

    def __enter__(self) -> ArchiveReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def read_archive(path: str | os.PathLike[str]) -> ArchiveReader:
    """Open an archive for reading (see `ArchiveReader`)."""
    try:
        return ArchiveReader(path)
    except tarfile.ReadError as exc:
        raise InvalidArgument(f"{path} is not a cwm window archive: {exc}") from None
    except (tarfile.TarError, EOFError) as exc:
        raise DataLoss(f"{path}: the archive is damaged ({exc})") from None


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
            f"window {window.name!r} in this archive expired at {_iso(window.expires_at)}; "
            "give it a new lifetime (ttl_seconds, `--ttl SECONDS`, 0 = never) to import it"
        )
    return left


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


def import_window(
    client: WindowClient,
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
    replace: bool = False,
    ttl_seconds: int | None = None,
    progress: Progress | None = None,
) -> ImportResult:
    """Freeze the window stored in the archive at `path`, as `name` if given.

    The window keeps its token ids, fingerprint, chunking, session id, cache salt, parent,
    tags, description, pin and remaining lifetime (`ttl_seconds` overrides the lifetime;
    0 means never expire). Only the chunks the manager lacks are read and sent, each
    verified first; a corrupt chunk raises DataLoss and nothing is committed.
    """
    with read_archive(path) as archive:
        window = archive.window
        target = check_window_name(name or window.name)
        ttl = remaining_ttl(window) if ttl_seconds is None else ttl_seconds
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


__all__ = [
    "CHUNK_DIR",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_JSON",
    "MANIFEST_PB",
    "ArchiveChunk",
    "ArchiveReader",
    "ArchiveStats",
    "ExportResult",
    "ImportResult",
    "chunk_member_name",
    "export_window",
    "import_window",
    "manifest_summary",
    "read_archive",
    "remaining_ttl",
    "write_archive",
]
