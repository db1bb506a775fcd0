"""Progress reporting of a freeze or thaw, summed over its streams when it has several."""

from __future__ import annotations

import threading
from collections.abc import Callable

Progress = Callable[[int, int], None]
"""Called with (bytes_done, bytes_total) as a freeze or thaw moves chunk bytes."""


class ProgressSum:
    """Adds up the progress of several streams into one callback (thread-safe)."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self._progress = progress
        self._total = total
        self._done = 0
        self._lock = threading.Lock()

    def stream(self) -> Progress | None:
        if self._progress is None:
            return None
        last = [0]

        def report(done: int, total: int) -> None:
            del total
            with self._lock:
                self._done += done - last[0]
                last[0] = done
                done_all = self._done
            assert self._progress is not None
            self._progress(done_all, self._total)

        return report
