"""The durable tier: one content-addressed file per chunk under <data>/chunks/<tenant>/.

Files are written tmp -> fsync -> rename -> fsync(dir), so a file under its final name is
always complete (with fsync on, the tmp file is written with O_DIRECT where the filesystem
allows it: see `DiskTier.write`). Each starts with the tiers' chunk header (`format`), so a
file decodes, and fsck checks it, without the catalog. Nothing here trusts what it reads:
the store verifies the decoded bytes against the digest.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cwm_server.manager.tiers.base import ChunkCorrupt, ChunkTier
from cwm_server.manager.tiers.format import HEADER_SIZE, StoredChunk, pack_header, unpack_header

TMP_SUFFIX = ".tmp"

DIRECT_ALIGN = 4096
"""O_DIRECT needs the buffer's address and length aligned to the device's logical block
size; a page is a multiple of every block size Linux supports."""


STAGING_BYTES = 4 << 20
"""Largest piece an O_DIRECT write stages at once, so the staging buffers (one per I/O
thread) stay small however large the chunks are."""


def _fill(
    staging: memoryview,
    staging_address: int,
    header: bytes,
    source: memoryview,
    source_address: int,
    offset: int,
    size: int,
) -> None:
    """Copy bytes [offset, offset + size) of header + source (all within the file) to the
    start of `staging` (whose first byte is at `staging_address`; the source's at
    `source_address`). The bulk of it is a `memmove` that releases the GIL: a slice
    assignment holds it for the whole piece, and with chunks arriving on a bulk connection
    that stalled the thread receiving the next chunk for as long (profiled under `cwm
    serve`: most of the GIL's time in a freeze went to this copy)."""
    filled = 0
    if offset < HEADER_SIZE:
        head = header[offset : offset + size]
        staging[: len(head)] = head
        filled = len(head)
    start = max(0, offset - HEADER_SIZE)
    count = size - filled
    if count > 0:
        ctypes.memmove(staging_address + filled, source_address + start, count)


def _address(view: memoryview) -> int:
    """Where a contiguous buffer's first byte is (read-only ones too)."""
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if len(view) else 0


def _clear_direct(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)


class _StagingBuffer(threading.local):
    """Each I/O thread's page-aligned buffer for O_DIRECT writes, grown to the largest file
    it has written and then reused (so its pages stay mapped)."""

    def __init__(self) -> None:
        self.buffer: mmap.mmap | None = None

    def at_least(self, size: int) -> mmap.mmap:
        if self.buffer is None or len(self.buffer) < size:
            if self.buffer is not None:
                self.buffer.close()
            # Private: a child forked after this must not write through the same pages.
            self.buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return self.buffer


@dataclass(frozen=True)
class DiskFile:
    """One file under the tier's root, as `DiskTier.files` finds it."""

    path: Path
    relative: Path
    """Its path under the root (<tenant>/<2 hex>/<digest hex> for a chunk file)."""
    tenant: str = ""
    digest: bytes | None = None
    """Set for a chunk file: a file named for a digest in its own place."""
    temp: bool = False
    """A tmp file of a write that has not been renamed into place (or never will be)."""


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


class DiskTier(ChunkTier[StoredChunk]):
    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = root / "chunks"
        self.root.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._root = str(self.root)
        self._pid = os.getpid()
        self._made_dirs: set[str] = set()
        """Directories known to exist: each write would otherwise pay a mkdir syscall and
        a FileExistsError (and the GIL round trips around them)."""
        self.direct = fsync and hasattr(os, "O_DIRECT")
        """Write durable files with O_DIRECT; turned off for good the first time the
        filesystem refuses it (EINVAL: tmpfs, some FUSE and network filesystems)."""
        self._staging = _StagingBuffer()

    def path_for(self, tenant: str, digest: bytes) -> Path:
        hexd = digest.hex()
        return self.root / tenant / hexd[:2] / hexd

    def contains(self, tenant: str, digests: Sequence[bytes]) -> set[bytes]:
        return {digest for digest in digests if self.path_for(tenant, digest).exists()}

    def write(self, tenant: str, digest: bytes, chunk: StoredChunk) -> int:
        """Store a chunk durably; returns the bytes it occupies (header included).

        tmp -> fsync -> rename -> fsync(dir), with as few system calls as that allows
        (header and data in one writev), since every call on an I/O thread is a GIL round
        trip that the event loop thread competes for.

        With fsync on, the tmp file's whole blocks are written with O_DIRECT from a reused
        page-aligned buffer (one memcpy), its last partial block with an ordinary write,
        then it is fsynced. Durability is the same; the difference is that a buffered write
        copies into page-cache pages the kernel has to allocate, and first-touching fresh
        pages costs a freeze several times the CPU of the direct write (measured in
        docs/BENCHMARKS.md). Freshly written chunks are then not in the page cache; the
        memory tier holds them."""
        hexd = digest.hex()
        directory = os.path.join(self._root, tenant, hexd[:2])
        if directory not in self._made_dirs:
            os.makedirs(directory, exist_ok=True)
            self._made_dirs.add(directory)
        path = os.path.join(directory, hexd)
        tmp = f"{path}.{self._pid}.{threading.get_ident():x}{TMP_SUFFIX}"
        header = pack_header(chunk.codec, chunk.word_size, chunk.raw_size)
        encoded = chunk.data
        total = HEADER_SIZE + len(encoded)
        try:
            if not (self.direct and self._write_direct(tmp, directory, header, encoded, total)):
                self._write_buffered(tmp, directory, header, encoded, total)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):  # a full disk, say: leave no tmp file behind
                os.unlink(tmp)
            raise
        if self._fsync:
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return total

    def _open_tmp(self, tmp: str, directory: str, extra_flags: int) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | extra_flags
        try:
            return os.open(tmp, flags, 0o600)
        except FileNotFoundError:  # the directory went away (a clean-up): make it again
            self._made_dirs.discard(directory)
            os.makedirs(directory, exist_ok=True)
            self._made_dirs.add(directory)
            return os.open(tmp, flags, 0o600)

    def _write_buffered(
        self, tmp: str, directory: str, header: bytes, encoded: bytes | memoryview, total: int
    ) -> None:
        fd = self._open_tmp(tmp, directory, 0)
        try:
            written = os.writev(fd, [header, encoded])
            if written < total:  # short write: finish the rest the slow way
                view = memoryview(header + bytes(encoded))[written:]
                while view:
                    view = view[os.write(fd, view) :]
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _write_direct(
        self, tmp: str, directory: str, header: bytes, encoded: bytes | memoryview, total: int
    ) -> bool:
        """Write and fsync `tmp`: its whole 4 KiB blocks with O_DIRECT, through the thread's
        staging buffer in pieces of at most STAGING_BYTES, then the last partial block with
        an ordinary write (padding it and cutting the file back made ext4 read that block
        back in at fsync). False (nothing written, direct I/O off from now on) if the
        filesystem refuses O_DIRECT."""
        aligned = total - total % DIRECT_ALIGN
        buffer = self._staging.at_least(max(DIRECT_ALIGN, min(aligned, STAGING_BYTES)))
        try:
            fd = self._open_tmp(tmp, directory, os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.direct = False
            return False
        try:
            direct = True
            with memoryview(buffer) as staging, memoryview(encoded) as source:
                staging_address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
                source_address = _address(source.cast("B"))
                offset = 0
                while offset < total:
                    if offset < aligned:
                        size = min(STAGING_BYTES, aligned - offset)
                    else:  # the last partial block
                        size = total - offset
                        if direct:
                            _clear_direct(fd)
                            direct = False
                    _fill(staging, staging_address, header, source, source_address, offset, size)
                    done = 0
                    while done < size:
                        try:
                            written = os.pwrite(fd, staging[done:size], offset + done)
                        except OSError as exc:
                            if exc.errno != errno.EINVAL or offset + done or not direct:
                                raise
                            self.direct = False  # opened, but the filesystem refuses it
                            return False
                        if written <= 0:
                            raise OSError(errno.EIO, f"write to {tmp} wrote nothing")
                        done += written
                        if direct and done < size and (offset + done) % DIRECT_ALIGN:
                            # A short write off a block boundary (a nearly full disk): go on
                            # buffered, so the next write reports the real error (ENOSPC).
                            _clear_direct(fd)
                            direct = False
                    offset += size
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def read(self, tenant: str, digest: bytes) -> StoredChunk | None:
        """The chunk file's header and encoded bytes; None if there is no such file. The
        bytes are read straight into one object of their exact size (one copy from the page
        cache, no slicing after)."""
        path = self.path_for(tenant, digest)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                raise ChunkCorrupt(f"{path}: truncated header", "truncated header")
            head = os.pread(fd, HEADER_SIZE, 0)
            data = _read_exactly(fd, size - HEADER_SIZE, HEADER_SIZE)
        finally:
            os.close(fd)
        try:
            codec, word_size, raw_size = unpack_header(head)
        except ValueError as exc:
            raise ChunkCorrupt(f"{path}: {exc}", str(exc)) from None
        return StoredChunk(codec=codec, word_size=word_size, raw_size=raw_size, data=data)

    def remove(self, tenant: str, digests: Sequence[bytes]) -> None:
        for digest in digests:
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
                digest = _digest_named(path.name)
                if digest is not None:
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

    def files(self) -> Iterator[DiskFile]:
        """Every file under the root, in path order, each told apart as a chunk file, a tmp
        file, or neither (a stray: nothing the manager writes), for fsck."""
        if not self.root.exists():
            return
        for path in sorted(p for p in self.root.rglob("*") if p.is_file()):
            relative = path.relative_to(self.root)
            if path.name.endswith(TMP_SUFFIX):
                yield DiskFile(path, relative, temp=True)
                continue
            parts = relative.parts
            digest = _digest_named(path.name)
            if len(parts) == 3 and digest is not None and self.path_for(parts[0], digest) == path:
                yield DiskFile(path, relative, tenant=parts[0], digest=digest)
            else:
                yield DiskFile(path, relative)


def _digest_named(name: str) -> bytes | None:
    """The digest a chunk file's name spells, or None if the name is not one."""
    if len(name) != 64:
        return None
    try:
        digest = bytes.fromhex(name)
    except ValueError:
        return None
    return digest if len(digest) == 32 else None
