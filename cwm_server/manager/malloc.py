"""Process-wide allocator setting for the manager's entry point (`serve`)."""

from __future__ import annotations

from cwm_client.allocator import glibc_mallopt

_M_ARENA_MAX = -8
"""glibc's mallopt parameter number for the arena limit."""


def use_one_malloc_arena() -> bool:
    """Make glibc malloc use a single arena for this process; call it before threads start.

    Chunk buffers (~1 MiB) are allocated on one thread and freed on another: I/O threads
    read and verify, the event loop builds messages, gRPC threads serialize. With glibc's
    default of one arena per thread, every arena keeps its own high-water mark of such
    buffers and the hot tier's long-lived entries pin the holes between them, so RSS grew
    ~80 MiB beyond what the manager held (a 1 GiB thaw with a 64 MiB tier reached 230 MiB
    where 150 MiB was live). With one arena, whichever thread allocates next reuses the
    freed buffers; on 2 cores freeze and thaw were also faster. Returns False where the C
    library is not glibc or refuses (nothing changes then).
    """
    mallopt = glibc_mallopt()
    return bool(mallopt is not None and mallopt(_M_ARENA_MAX, 1) == 1)
