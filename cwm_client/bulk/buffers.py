"""Receive buffers for whole chunks that cost nothing before the bytes arrive.

`bytearray(n)` zero-fills its n bytes before a single byte is received: for a 32 MiB chunk
that pass over fresh memory cost more than receiving it (docs/BENCHMARKS.md). On CPython a
`bytes` object can be made without initializing its contents
(`PyBytes_FromStringAndSize(NULL, n)`); the receiver fills it through a writable view of its
buffer before anyone else holds it, and hands out a real `bytes`. Elsewhere (no ctypes, not
CPython) it falls back to a bytearray.
"""

from __future__ import annotations

import ctypes
import platform
import sys

SMALL = 4096
"""Below this a zero-filled bytearray is as cheap as anything."""

_OFFSET = sys.getsizeof(b"") - 1
"""Where a bytes object's contents start (after its header)."""
_new_bytes = None
if platform.python_implementation() == "CPython":
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
    window = (ctypes.c_char * size).from_address(id(data) + _OFFSET)
    return data, memoryview(window).cast("B")
