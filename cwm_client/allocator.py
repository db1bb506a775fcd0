"""Opt-in glibc malloc settings for processes that move many MiB-sized buffers.

- `tune_allocator()`: every message of a thaw or freeze passes through buffers of about
  its size: gRPC's read buffers, the bytes object Python makes of them, the chunk handed to
  the caller. With glibc's defaults, memory freed at the top of a heap beyond the trim
  threshold goes back to the kernel, and the next message faults it in again page by page.
  Fixing the mmap threshold (so such buffers come from the heap) and raising the trim
  threshold keeps those pages mapped and reused (the measured effect on thaw is in
  docs/BENCHMARKS.md). The price is that up to `keep_mib` of freed memory per heap stays in
  the process instead of going back to the system.
- `use_one_malloc_arena()`: for a server whose buffers are allocated on one thread and freed
  on another (the manager calls it).

A library must not change its host process's allocator behind its back, so nothing here
runs on import: an application calls these once, early (every `cwm` command calls
`tune_allocator()`, the manager both).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from collections.abc import Callable

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
"""glibc's mallopt parameter numbers."""

MMAP_THRESHOLD_BYTES = 32 << 20
"""glibc's own ceiling for its dynamic mmap threshold: buffers below this come from the
heap (where freed ones are reused) rather than from fresh mmaps."""


def tune_allocator(keep_mib: int = 64) -> bool:
    """Keep up to `keep_mib` MiB of freed memory per malloc heap mapped for reuse, and
    serve allocations under 32 MiB from the heap. Returns False where the C library is not
    glibc or refuses (nothing changes then). A process with several malloc arenas (one per
    thread by default, up to 8 per core) can keep that much in each."""
    if not 0 <= keep_mib < 2048:
        raise ValueError(f"keep_mib must be in 0..2047 (mallopt takes an int), got {keep_mib}")
    mallopt = glibc_mallopt()
    if mallopt is None:
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
        and mallopt(_M_TRIM_THRESHOLD, keep_mib << 20) == 1
    )


def use_one_malloc_arena() -> bool:
    """Make glibc malloc use a single arena for this process; call it before threads start.

    In the manager, chunk buffers are allocated on one thread and freed on another: I/O
    threads read and verify, the event loop builds messages, gRPC threads serialize. With
    glibc's default of one arena per thread, every arena keeps its own high-water mark of
    such buffers and the hot tier's long-lived entries pin the holes between them, so the
    resident set grows well beyond what the manager holds. With one arena, whichever thread
    allocates next reuses the freed buffers. Returns False where the C library is not glibc
    or refuses (nothing changes then).
    """
    mallopt = glibc_mallopt()
    return bool(mallopt is not None and mallopt(_M_ARENA_MAX, 1) == 1)


def glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's `mallopt(param, value)`, or None where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt  # type: ignore[no-any-return]
