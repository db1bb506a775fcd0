"""The manager's threads: one for the catalog, a few for disk I/O and hashing.

The catalog thread is single so that the SQLite connection has one user (no locking) and a
catalog change is never interleaved with a collection's row check; the I/O threads verify,
compress, write and read chunks off the event loop. `store_slots` bounds how many chunks all
freeze streams together have in flight on the I/O threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from cwm_client.errors import ResourceExhausted

T = TypeVar("T")


class Executors:
    def __init__(self, io_threads: int) -> None:
        self.io_threads = io_threads
        self._db_executor = ThreadPoolExecutor(1, thread_name_prefix="cwm-catalog")
        self._io_executor = ThreadPoolExecutor(io_threads, thread_name_prefix="cwm-io")
        self._store_slots: asyncio.Semaphore | None = None

    async def db(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(*args)` on the catalog thread. SQLite's "database or disk is full" is
        RESOURCE_EXHAUSTED (DISK_FULL) saying what to do, not an INTERNAL traceback."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._db_executor, fn, *args)
        except sqlite3.OperationalError as exc:
            if "full" not in str(exc):
                raise
            raise ResourceExhausted(
                f"the disk holding the catalog is full ({exc}); free space on it, or delete "
                "windows (`cwm rm` works on a full disk), then retry",
                reason="DISK_FULL",
            ) from None

    async def io(self, fn: Callable[..., T], *args: object) -> T:
        """Run blocking chunk work on the I/O threads."""
        return await asyncio.get_running_loop().run_in_executor(self._io_executor, fn, *args)

    def submit_io(self, fn: Callable[..., T], *args: object) -> concurrent.futures.Future[T]:
        """Run blocking work on the I/O threads, returning the thread-side future (which a
        caller can wait for even after the awaiting task was cancelled)."""
        return self._io_executor.submit(fn, *args)

    def store_slots(self) -> asyncio.Semaphore:
        """Chunks being verified and stored at once, across every freeze stream (made on
        first use, on the event loop that uses it)."""
        if self._store_slots is None:
            self._store_slots = asyncio.Semaphore(max(1, self.io_threads))
        return self._store_slots

    def close(self) -> None:
        """Wait for the work queued on both pools, then stop their threads."""
        self._io_executor.shutdown(wait=True)
        self._db_executor.shutdown(wait=True)
