"""What the suite compares cwm with, on the same bytes.

- the ceiling: a plain loopback TCP transfer, and a plain file write (fsync'd, as durable as
  a committed window) and read (page cache warm) of one file;
- what users would otherwise pick: redis-py SET/GET of each chunk on a local redis-server
  (what LMCache's `redis://` tier does: one key per chunk, no pipelining), and a whole-file
  save/restore of the session's raw KV with its token ids (what llama.cpp's slot save does:
  one file, fwrite without fsync; restore reads it back and splits it into the cache).
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from common import MiB, Timing, free_port, timed


def tcp_loopback(pieces: Sequence[bytes], repeat: int) -> Timing:
    """Send every chunk over one loopback TCP connection; the receiver reads into a reused
    buffer (nothing parsed, nothing verified)."""
    total = sum(len(p) for p in pieces)

    def once() -> None:
        server = socket.create_server(("127.0.0.1", 0))
        port = server.getsockname()[1]
        received = [0]

        def sink() -> None:
            conn, _ = server.accept()
            buf = bytearray(4 * MiB)
            view = memoryview(buf)
            while (n := conn.recv_into(view)) > 0:
                received[0] += n
            conn.close()

        thread = threading.Thread(target=sink)
        thread.start()
        client = socket.create_connection(("127.0.0.1", port))
        for piece in pieces:
            client.sendall(piece)
        client.shutdown(socket.SHUT_WR)
        thread.join()
        client.close()
        server.close()
        assert received[0] == total

    return timed(once, total / MiB, repeat)


def file_write_read(pieces: Sequence[bytes], scratch: Path, repeat: int) -> tuple[Timing, Timing]:
    """One file: write every chunk then fsync (the durable ceiling), and read it back in
    chunk-sized reads into a preallocated buffer (page cache warm: the read ceiling)."""
    total = sum(len(p) for p in pieces)
    path = scratch / "plain.bin"

    def write() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for piece in pieces:
                os.write(fd, piece)
            os.fsync(fd)
        finally:
            os.close(fd)

    buffer = bytearray(total)

    def read() -> None:
        view = memoryview(buffer)
        with open(path, "rb", buffering=0) as handle:
            offset = 0
            for piece in pieces:
                got = handle.readinto(view[offset : offset + len(piece)])
                assert got == len(piece)
                offset += got

    write_t = timed(write, total / MiB, repeat)
    read_t = timed(read, total / MiB, repeat)
    path.unlink()
    return write_t, read_t


_SLOT_MAGIC = b"SLOT"


def slot_save_restore(
    pieces: Sequence[bytes], token_ids: Sequence[int], scratch: Path, repeat: int
) -> tuple[Timing, Timing]:
    """llama.cpp-style slot save: a header, the token ids, then all the KV, written with
    buffered writes and no fsync; restore reads the file and copies each chunk out."""
    total = sum(len(p) for p in pieces)
    path = scratch / "slot.bin"
    ids = struct.pack(f"<{len(token_ids)}I", *token_ids)
    sizes = [len(p) for p in pieces]

    def save() -> None:
        with open(path, "wb") as handle:
            handle.write(_SLOT_MAGIC + struct.pack("<QQ", len(token_ids), len(pieces)))
            handle.write(ids)
            handle.write(struct.pack(f"<{len(sizes)}Q", *sizes))
            for piece in pieces:
                handle.write(piece)

    def restore() -> None:
        with open(path, "rb") as handle:
            blob = handle.read()
        view = memoryview(blob)
        assert view[:4] == _SLOT_MAGIC
        count_ids, count_chunks = struct.unpack_from("<QQ", view, 4)
        offset = 20 + 4 * count_ids
        lengths = struct.unpack_from(f"<{count_chunks}Q", view, offset)
        offset += 8 * count_chunks
        restored = []
        for length in lengths:
            restored.append(bytes(view[offset : offset + length]))
            offset += length
        assert len(restored) == len(pieces)

    save_t = timed(save, total / MiB, repeat)
    restore_t = timed(restore, total / MiB, repeat)
    path.unlink()
    return save_t, restore_t


class RedisServer:
    """A private redis-server on a free loopback port, no persistence."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="cwm-bench-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise FileNotFoundError("redis-server is not installed")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--protected-mode",
                "no",
                "--proto-max-bulk-len",
                str(512 * MiB),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
        shutil.rmtree(self.dir, ignore_errors=True)


def redis_set_get(pieces: Sequence[bytes], port: int, repeat: int) -> tuple[Timing, Timing]:
    """redis-py SET then GET of each chunk under its own key, one round trip each."""
    import redis

    total = sum(len(p) for p in pieces)
    client = redis.Redis(host="127.0.0.1", port=port)
    keys = [f"kv:{i}" for i in range(len(pieces))]

    def put() -> None:
        for key, piece in zip(keys, pieces, strict=True):
            client.set(key, piece)

    def get() -> None:
        for key, piece in zip(keys, pieces, strict=True):
            value = client.get(key)
            assert value is not None and len(value) == len(piece)

    set_t = timed(put, total / MiB, repeat)
    get_t = timed(get, total / MiB, repeat)
    client.flushall()
    client.close()
    return set_t, get_t
