"""The durable tier: one content-addressed file per chunk under <data>/chunks/<tenant>/.

Files are written tmp -> fsync -> rename -> fsync(dir), so a file under its final name is
always complete. Each starts with a 16-byte header (magic, version, codec, word size, raw
size) so a file decodes, and fsck checks it, without the catalog. A codec with its high bit
set (encryption.SEALED) marks a payload sealed in an encryption envelope; this tier stores
it like any other bytes. Nothing here trusts what it reads: callers verify the decoded
bytes against the digest.
"""

from __future__ import annotations

import os
import struct
import threading
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


def pack_header(codec: int, word_size: int, raw_size: int, magic: bytes = MAGIC) -> bytes:
    """The 16-byte header every tier stores before a chunk's bytes; `magic` names the tier
    (a Redis value is never mistaken for a chunk file)."""
    return _HEADER.pack(magic, VERSION, codec, word_size, raw_size)


def unpack_header(header: bytes, magic: bytes = MAGIC) -> tuple[int, int, int]:
    """(codec, word size, raw size) of a header; ValueError if it is not one of `magic`."""
    if len(header) != HEADER_SIZE:
        raise ValueError("truncated header")
    found, version, codec, word_size, raw_size = _HEADER.unpack(header)
    if found != magic or version != VERSION:
        raise ValueError("bad magic or version")
    return codec, word_size, raw_size


def _read_exactly(fd: int, size: int, offset: int) -> bytes:
    """`size` bytes at `offset` (fewer only if the file is shorter)."""
    data = os.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    pieces = [data]  # a short read (signals, odd filesystems): rare, so joining is fine
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            break
        pieces.append(more)
        got += len(more)
    return b"".join(pieces)


class DiskTier:
    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = root / "chunks"
        self.root.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._root = str(self.root)
        self._pid = os.getpid()
        self._made_dirs: set[str] = set()
        """Directories known to exist: each write would otherwise pay a mkdir syscall and
        a FileExistsError (and the GIL round trips around them)."""

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
        """Store a chunk durably; returns the bytes it occupies (header included).

        tmp -> fsync -> rename -> fsync(dir), with as few system calls as that allows
        (header and data in one writev), since every call on an I/O thread is a GIL round
        trip that the event loop thread competes for."""
        hexd = digest.hex()
        directory = os.path.join(self._root, tenant, hexd[:2])
        if directory not in self._made_dirs:
            os.makedirs(directory, exist_ok=True)
            self._made_dirs.add(directory)
        path = os.path.join(directory, hexd)
        tmp = f"{path}.{self._pid}.{threading.get_ident():x}{TMP_SUFFIX}"
        header = pack_header(codec, word_size, raw_size)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except FileNotFoundError:  # the directory went away (a clean-up): make it again
            self._made_dirs.discard(directory)
            os.makedirs(directory, exist_ok=True)
            self._made_dirs.add(directory)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            total = HEADER_SIZE + len(encoded)
            written = os.writev(fd, [header, encoded])
            if written < total:  # short write: finish the rest the slow way
                view = memoryview(header + bytes(encoded))[written:]
                while view:
                    view = view[os.write(fd, view) :]
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if self._fsync:
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return HEADER_SIZE + len(encoded)

    def read(self, tenant: str, digest: bytes) -> StoredChunk:
        """The chunk file's header and encoded bytes. The bytes are read straight into one
        object of their exact size (one copy from the page cache, no slicing after)."""
        path = self.path_for(tenant, digest)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ChunkFileMissing(str(path)) from None
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                raise ChunkFileCorrupt(f"{path}: truncated header")
            head = os.pread(fd, HEADER_SIZE, 0)
            data = _read_exactly(fd, size - HEADER_SIZE, HEADER_SIZE)
        finally:
            os.close(fd)
        try:
            codec, word_size, raw_size = unpack_header(head)
        except ValueError as exc:
            raise ChunkFileCorrupt(f"{path}: {exc}") from None
        return StoredChunk(codec=codec, word_size=word_size, raw_size=raw_size, data=data)

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
