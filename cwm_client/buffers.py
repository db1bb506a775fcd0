"""Buffers for whole received chunks that cost nothing before the bytes arrive.

Two costs come before a single byte of a large chunk is received into a new buffer:
`bytearray(n)` zero-fills it, and a buffer of 32 MiB or more (an 8B model's 256-token chunk)
is a fresh mmap whose every page faults in, zeroed by the kernel, on first touch (glibc
serves allocations that large from mmap, whatever `tune_allocator` asks). Measured, both
cost more than receiving the bytes (docs/BENCHMARKS.md).

- `receive_buffer(n)`: on CPython, a `bytes` object made without initializing its contents
  (`PyBytes_FromStringAndSize(NULL, n)`), and a writable view through which the receiver
  fills it before anyone else holds it. Elsewhere, a bytearray.
- `BufferPool`: large such buffers kept for reuse. A buffer is handed out again only when
  the pool holds the last reference to it (the caller dropped the chunk: no one can see the
  bytes change), and its cached hash is reset. A thaw reading chunk after chunk of one size
  then touches the same pages every time.
"""

from __future__ import annotations

import ctypes
import platform
import sys
import threading

SMALL = 4096
"""Below this a zero-filled bytearray is as cheap as anything."""
POOLED = 1 << 20
"""Buffers of at least this many bytes are worth keeping for reuse."""

_CPYTHON = platform.python_implementation() == "CPython"
_OFFSET = sys.getsizeof(b"") - 1
"""Where a bytes object's contents start (after its header)."""
_HASH_OFFSET = _OFFSET - ctypes.sizeof(ctypes.c_ssize_t)
"""Where a bytes object caches its hash (-1: not computed), just before its contents."""
_new_bytes = None
if _CPYTHON:
    _new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
    _new_bytes.restype = ctypes.py_object
    _new_bytes.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]


def receive_buffer(size: int) -> tuple[bytes | bytearray, memoryview]:
    """A buffer of `size` bytes and a writable view of it. Fill the view completely and
    release it before handing the buffer on: until then the bytes are undefined."""
    if _new_bytes is None or size < SMALL:
        buffer = bytearray(size)
        return buffer, memoryview(buffer)
    data: bytes = _new_bytes(None, size)
    return data, _view(data)


def _view(data: bytes) -> memoryview:
    window = (ctypes.c_char * len(data)).from_address(id(data) + _OFFSET)
    return memoryview(window).cast("B")


class BufferPool:
    """Up to `keep` large receive buffers per size, reused once no one else holds them."""

    def __init__(self, keep: int = 8) -> None:
        self._keep = keep
        self._lock = threading.Lock()
        self._kept: dict[int, list[bytes]] = {}

    def take(self, size: int) -> tuple[bytes | bytearray, memoryview]:
        """As `receive_buffer`, from the pool where it can."""
        if _new_bytes is None or size < POOLED:
            return receive_buffer(size)
        with self._lock:
            kept = self._kept.setdefault(size, [])
            for data in kept:
                # Held by the list, this loop and getrefcount's argument: nobody else.
                if sys.getrefcount(data) <= 3:
                    ctypes.c_ssize_t.from_address(id(data) + _HASH_OFFSET).value = -1
                    return data, _view(data)
            fresh, view = receive_buffer(size)
            if len(kept) < self._keep:
                assert isinstance(fresh, bytes)
                kept.append(fresh)
            return fresh, view
