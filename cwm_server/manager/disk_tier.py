"""The durable tier: one content-addressed file per chunk under <data>/chunks/<tenant>/.

Files are written tmp -> fsync -> rename -> fsync(dir), so a file under its final name is
always complete. Each starts with a 16-byte header (magic, version, codec, word size, raw
size) so a file decodes, and fsck checks it, without the catalog. Nothing here trusts what
it reads: callers verify the decoded bytes against the digest.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"CWMC"
VERSION = 1
_HEADER = struct.Struct("<4sBBHQ")
HEADER_SIZE = _HEADER.size
TMP_SUFFIX = ".tmp"


class ChunkFileMissing(Exception):
    """The chunk's file does not exist."""


class ChunkFileCorrupt(Exception):
    """The chunk's file exists but its header is unreadable."""


@dataclass(frozen=True)
class StoredChunk:
    codec: int
    word_size: int
    raw_size: int
    data: bytes


class DiskTier:
    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = root / "chunks"
        self.root.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync

    def path_for(self, tenant: str, digest: bytes) -> Path:
        hexd = digest.hex()
        return self.root / tenant / hexd[:2] / hexd

    def exists(self, tenant: str, digest: bytes) -> bool:
        return self.path_for(tenant, digest).exists()

    def write(
        self,
        tenant: str,
        digest: bytes,
        codec: int,
        word_size: int,
        raw_size: int,
        encoded: bytes | memoryview,
    ) -> int:
        """Store a chunk durably; returns the bytes it occupies (header included)."""
        path = self.path_for(tenant, digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{id(encoded):x}{TMP_SUFFIX}")
        header = _HEADER.pack(MAGIC, VERSION, codec, word_size, raw_size)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, header)
            view = memoryview(encoded)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if self._fsync:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return HEADER_SIZE + len(encoded)

    def read(self, tenant: str, digest: bytes) -> StoredChunk:
        path = self.path_for(tenant, digest)
        try:
            with open(path, "rb", buffering=0) as handle:
                blob = handle.read()
        except FileNotFoundError:
            raise ChunkFileMissing(str(path)) from None
        if len(blob) < HEADER_SIZE:
            raise ChunkFileCorrupt(f"{path}: truncated header")
        magic, version, codec, word_size, raw_size = _HEADER.unpack_from(blob)
        if magic != MAGIC or version != VERSION:
            raise ChunkFileCorrupt(f"{path}: bad magic or version")
        return StoredChunk(
            codec=codec, word_size=word_size, raw_size=raw_size, data=blob[HEADER_SIZE:]
        )

    def remove(self, tenant: str, digest: bytes) -> None:
        self.path_for(tenant, digest).unlink(missing_ok=True)

    def iter_chunks(self) -> Iterator[tuple[str, bytes, Path]]:
        """Every chunk file as (tenant, digest, path); skips temp files and stray names."""
        if not self.root.exists():
            return
        for tenant_dir in sorted(self.root.iterdir()):
            if not tenant_dir.is_dir():
                continue
            for path in sorted(tenant_dir.glob("*/*")):
                if path.name.endswith(TMP_SUFFIX):
                    continue
                try:
                    digest = bytes.fromhex(path.name)
                except ValueError:
                    continue
                if len(digest) == 32:
                    yield tenant_dir.name, digest, path

    def remove_temp_files(self) -> int:
        """Delete half-written files left by a crash; returns how many."""
        count = 0
        for path in self.root.glob(f"*/*/*{TMP_SUFFIX}"):
            path.unlink(missing_ok=True)
            count += 1
        return count

    def file_count(self) -> int:
        return sum(1 for _ in self.iter_chunks())
