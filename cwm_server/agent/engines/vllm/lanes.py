"""A lane: one daemon thread that runs submitted jobs in order, started on first use.

The connector keeps disk and copy work off vLLM's step this way: the scheduler side writes
session records on one, the worker side loads (the loader) and saves (the saver) on others.
A job reports its own failures; an exception that escapes one is logged and the lane goes on.

A lane may run on CPUs of its own (`cpus`): vLLM's CPU build pins the worker's threads to the
cores its forward pass uses, and a thread the worker starts inherits that pin, so without this
a load's hashing and copying would take turns with the forward pass on the same cores (vLLM's
own NIXL connector reserves a core per NUMA node for its transfers the same way).
`transfer_cpus` picks them.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from vllm.logger import init_logger

# Under "vllm.": vLLM configures only its own loggers' handlers.
logger = init_logger(f"vllm.cwm.{__name__.rsplit('.', 1)[-1]}")


def parse_cpus(text: str) -> set[int]:
    """`0,2-3` -> {0, 2, 3} (ValueError on anything else)."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        low = int(first)
        high = int(last) if last else low
        if low < 0 or high < low:
            raise ValueError(f"bad CPU range {part!r}")
        cpus.update(range(low, high + 1))
    if not cpus:
        raise ValueError("no CPUs named")
    return cpus


def transfer_cpus(option: str, pinned: set[int], online: set[int]) -> set[int] | None:
    """The CPUs the worker's loader and saver run on, for the connector's `cwm_transfer_cpus`
    option: "auto" gives the CPUs vLLM's threads are not pinned to (`pinned`, the worker's
    own affinity), or None (stay as inherited) when it is pinned to none or to all of them;
    "inherit" gives None; anything else is a CPU list (`0,2-3`)."""
    choice = option.strip().lower()
    if choice == "inherit":
        return None
    if choice == "auto":
        free = online - pinned
        return free or None
    cpus = parse_cpus(choice)
    if not cpus <= online:
        raise ValueError(f"cwm_transfer_cpus names CPUs {sorted(cpus - online)} not online here")
    return cpus


def online_cpus() -> set[int]:
    """The CPUs this machine has online (all of them, whatever this thread is pinned to)."""
    try:
        return parse_cpus(Path("/sys/devices/system/cpu/online").read_text())
    except (OSError, ValueError):
        return set(range(os.cpu_count() or 1))


class Lane:
    def __init__(self, name: str, cpus: set[int] | None = None) -> None:
        self.name = name
        self.cpus = cpus
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
        if self.cpus:
            try:
                os.sched_setaffinity(0, self.cpus)  # this thread only
            except OSError as exc:
                logger.warning("%s: cannot run on CPUs %s: %s", self.name, sorted(self.cpus), exc)
        while True:
            job = self._jobs.get()
            try:
                job()
            except Exception as exc:  # noqa: BLE001 - a job reports its own failures
                logger.error("%s: %s", self.name, exc)
