"""The agent's side of "kept until used": thawed windows left staged for their session's first
request, and their removal.

After a thaw the window's blocks sit in vLLM's prefix cache, which may evict them before the
session's first request. So a thawed window stays staged, with `load/<id>/keep.json` (salt,
expiry) beside its manifest, and the connector's scheduler re-loads from it whatever the
cache lost when that request comes (`scheduler.CwmConnectorScheduler._match_kept`), then
removes it. This module removes the kept windows nobody used: when they expire, or the
oldest first when the kept bytes pass their budget.

Ownership is settled by files in an order that needs no lock: the scheduler writes its claim
(`first-use/scheduler.json`) before it checks `keep.json`, and this side unlinks `keep.json`
before it looks for a claim; whichever sees the other's file leaves the staging to it. A
window with a claim is the scheduler's to remove.

Standard library only, like `staging`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cwm_server.agent.engines.vllm import staging


@dataclass
class _Kept:
    op_id: str
    expires_at: float
    size: int


class KeptWindows:
    """The thawed windows this agent handed to the connector, oldest first."""

    def __init__(
        self,
        root: Path,
        chunk_root: Path,
        seconds: float,
        max_bytes: int,
        recycle: Callable[[Path], None] | None = None,
    ) -> None:
        self.root = root
        self._recycle = recycle
        """Takes back an unused window's chunk folder (the agent's `pool.ChunkPool`)."""
        self.chunk_root = chunk_root
        self.seconds = seconds
        self.max_bytes = max_bytes
        self._kept: dict[str, _Kept] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.seconds > 0 and self.max_bytes > 0

    @property
    def kept_bytes(self) -> int:
        return sum(kept.size for kept in self._kept.values())

    def __len__(self) -> int:
        return len(self._kept)

    def _dir(self, op_id: str) -> Path:
        return staging.op_dir(self.root, staging.LOAD_DIR, op_id)

    def keep(self, op_id: str, cache_salt: str, tokens: int, size: int) -> bool:
        """Hand a loaded window to the connector for its session's first request; False
        (and the caller removes it) when keeping is off or the window alone is over budget."""
        if not self.enabled or size > self.max_bytes:
            return False
        expires_at = time.time() + self.seconds
        staging.write_json_atomic(
            self._dir(op_id) / staging.KEEP_FILE,
            {"cache_salt": cache_salt, "tokens": tokens, "expires_at": expires_at, "bytes": size},
        )
        with self._lock:
            self._kept[op_id] = _Kept(op_id, expires_at, size)
        self.sweep()
        return True

    def adopt(self, op_id: str) -> bool:
        """Take over a window a previous agent kept (True), unless it has expired or was
        claimed; the caller removes what is not adopted and not claimed."""
        keep = staging.read_json(self._dir(op_id) / staging.KEEP_FILE)
        expires_at = staging.keep_expiry(keep)
        if expires_at is None or expires_at <= time.time() or self.claimed(op_id):
            return False
        size = keep.get("bytes") if isinstance(keep, dict) else 0
        with self._lock:
            self._kept[op_id] = _Kept(op_id, expires_at, size if isinstance(size, int) else 0)
        return True

    def claimed(self, op_id: str) -> bool:
        """Whether a first request claimed the window (the scheduler then removes it)."""
        return (self._dir(op_id) / staging.FIRST_USE_DIR / staging.SCHEDULER_FILE).exists()

    def sweep(self, now: float | None = None) -> None:
        """Forget the windows a request claimed (or whose staging its scheduler already
        removed); remove the expired ones and, oldest first, those over the byte budget."""
        now = time.time() if now is None else now
        with self._lock:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        total = self.kept_bytes
        for kept in list(self._kept.values()):
            if self.claimed(kept.op_id) or not self._dir(kept.op_id).is_dir():
                # Claimed by a first request, or already removed after it.
                del self._kept[kept.op_id]
                total -= kept.size
                continue
            if kept.expires_at > now and total <= self.max_bytes:
                continue
            with contextlib.suppress(FileNotFoundError):
                (self._dir(kept.op_id) / staging.KEEP_FILE).unlink()
            del self._kept[kept.op_id]
            total -= kept.size
            if not self.claimed(kept.op_id):  # claimed since: the scheduler's now
                self.remove(kept.op_id)

    def release_all(self) -> None:
        """Give up every kept window now (their first requests then recompute, if the
        prefix cache lost them)."""
        self.sweep(now=float("inf"))

    def remove(self, op_id: str) -> None:
        chunks = staging.op_dir(self.chunk_root, staging.LOAD_DIR, op_id)
        if self._recycle is not None:  # never claimed: no worker reads these files
            self._recycle(chunks)
        staging.remove_tree(chunks)
        staging.remove_tree(self._dir(op_id))
