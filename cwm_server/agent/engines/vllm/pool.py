"""Staged chunk files kept for reuse: a thaw writes each chunk into a file whose pages already
exist instead of a new one.

Writing into a new shared-memory file makes the kernel find, zero and map every page first;
on the virtual machines measured here that cost more than the copy itself, and the worker's
mapping of a fresh file faults again (docs/BENCHMARKS.md, "vLLM at Llama-3.1-8B's KV
geometry"). So the agent keeps the chunk files of finished thaws in `<chunk root>/pool/` up
to a byte budget and renames one into place for the next chunk, writing over its pages.

The pool is the agent's: the connector only adds to it (the scheduler moves a kept window's
chunk files in once its first request is done with them; the pool adopts files it finds in
its folder) and removes it with the rest of the chunk root when vLLM shuts down. It is
trimmed to its budget on every return, and emptied when a thaw finds no room left in the
chunk root.

Standard library only, like `staging`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from pathlib import Path

from cwm_server.agent.engines.vllm.staging import POOL_DIR


class ChunkPool:
    def __init__(self, chunk_root: Path, max_bytes: int) -> None:
        self.folder = chunk_root / POOL_DIR
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._files: dict[Path, int] = {}
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._adopt()  # a previous agent's pool is ours now

    def _adopt(self) -> None:
        """Take in the files others put in the folder (the connector's scheduler, a previous
        agent), then keep to the budget."""
        with contextlib.suppress(OSError):
            found = {path for path in self.folder.iterdir() if path.suffix == ".bin"}
            with self._lock:
                for path in found - self._files.keys():
                    with contextlib.suppress(OSError):
                        self._files[path] = path.stat().st_size
        self._trim()

    @property
    def pooled_bytes(self) -> int:
        self._adopt()
        with self._lock:
            return sum(self._files.values())

    def __len__(self) -> int:
        self._adopt()
        with self._lock:
            return len(self._files)

    def write(self, path: Path, data: bytes | memoryview) -> bool:
        """Write `data` as the file `path`, into a pooled file where there is one (True),
        else into a new file (False). OSError as from any write."""
        reused = self._take(len(data))
        if reused is not None:
            try:
                os.rename(reused, path)
            except OSError:  # another file system (a chunk root moved under us): no reuse
                reused.unlink(missing_ok=True)
                reused = None
        if reused is None:
            with open(path, "wb") as handle:
                handle.write(data)
            return False
        fd = os.open(path, os.O_WRONLY)
        try:
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], done)
            if os.fstat(fd).st_size != len(view):
                os.ftruncate(fd, len(view))
        finally:
            os.close(fd)
        return True

    def give(self, path: Path) -> None:
        """Take back a chunk file that is no longer needed (removed if over budget)."""
        try:
            size = path.stat().st_size
        except OSError:
            return
        if self.max_bytes <= 0 or size == 0 or size > self.max_bytes:
            path.unlink(missing_ok=True)
            return
        target = self.folder / f"{uuid.uuid4().hex}.bin"
        try:
            os.rename(path, target)
        except OSError:
            path.unlink(missing_ok=True)
            return
        with self._lock:
            self._files[target] = size
        self._trim()

    def give_folder(self, folder: Path) -> None:
        """Take back every chunk file of a finished order's chunk folder."""
        with contextlib.suppress(OSError):
            for path in folder.iterdir():
                if path.is_file() and not path.is_symlink():
                    self.give(path)

    def drain(self) -> int:
        """Remove every pooled file (the chunk root is full, or the agent exits), the ones
        the scheduler recycled since the last look too; the bytes freed."""
        self._adopt()
        with self._lock:
            files, self._files = self._files, {}
        for path in files:
            path.unlink(missing_ok=True)
        return sum(files.values())

    def _take(self, size: int) -> Path | None:
        """The pooled file closest in size at or above `size` (else the largest one)."""
        self._adopt()
        with self._lock:
            if not self._files:
                return None
            fitting = [p for p, s in self._files.items() if s >= size]
            if fitting:
                path = min(fitting, key=self._files.__getitem__)
            else:
                path = max(self._files, key=self._files.__getitem__)
            del self._files[path]
        return path

    def _trim(self) -> None:
        with self._lock:
            extra = sum(self._files.values()) - self.max_bytes
            victims = []
            while extra > 0 and self._files:
                path = next(iter(self._files))  # oldest first
                extra -= self._files.pop(path)
                victims.append(path)
        for path in victims:
            path.unlink(missing_ok=True)
