"""A lane: one daemon thread that runs submitted jobs in order, started on first use.

The connector keeps disk and copy work off vLLM's step this way: the scheduler side writes
session records on one, the worker side loads (the loader) and saves (the saver) on others.
A job reports its own failures; an exception that escapes one is logged and the lane goes on.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from vllm.logger import init_logger

# Under "vllm.": vLLM configures only its own loggers' handlers.
logger = init_logger(f"vllm.cwm.{__name__.rsplit('.', 1)[-1]}")


class Lane:
    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.Queue[Callable[[], None]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            except Exception as exc:  # noqa: BLE001 - a job reports its own failures
                logger.error("%s: %s", self.name, exc)
