"""Reading an archive: its structure checked on opening, each chunk's bytes read on demand
and verified against its BLAKE3 digest."""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from google.protobuf.message import DecodeError

from cwm_client import pb
from cwm_client.archive.layout import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_JSON,
    MANIFEST_PB,
    MAX_MANIFEST_BYTES,
    chunk_member_name,
    short_digest,
)
from cwm_client.chunks import digest as blake3_digest
from cwm_client.errors import DataLoss, FailedPrecondition, InvalidArgument
from cwm_client.windows.progress import Progress


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
                    f"{self.path}: chunk {ref.index} ({short_digest(ref.digest)}) is {member.size} "
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
                    f"{self.path}: chunk {index} ({short_digest(ref.digest)}) cannot be read "
                    f"({exc})"
                ) from None
            if len(data) != ref.raw_size:
                raise DataLoss(
                    f"{self.path}: chunk {index} ({short_digest(ref.digest)}) is truncated: "
                    f"{len(data)} of {ref.raw_size} bytes"
                )
            if blake3_digest(data) != ref.digest:
                raise DataLoss(
                    f"{self.path}: chunk {index} ({short_digest(ref.digest)}) does not match its "
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
