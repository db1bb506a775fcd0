"""When the agent freezes a session on its own.

Two triggers: the session grew by at least `tokens` since its last freeze, or it has been
idle for `idle_seconds` with tokens not yet frozen. Each session's next auto-freeze is
incremental because unchanged chunks are already in the store.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from cwm_server.agent.engines.base import EngineSession


@dataclass(frozen=True)
class AutoFreezePolicy:
    tokens: int = 0
    """Freeze when this many tokens were added since the last freeze (0: off)."""
    idle_seconds: float = 0.0
    """Freeze a session idle this long with unfrozen tokens (0: off)."""

    @property
    def enabled(self) -> bool:
        return self.tokens > 0 or self.idle_seconds > 0

    def due(self, session: EngineSession, frozen_tokens: int, now: float) -> str | None:
        """Why `session` should be frozen now, or None."""
        grown = session.token_count - frozen_tokens
        if grown <= 0:
            return None
        if self.tokens and grown >= self.tokens:
            return f"grew by {grown} tokens"
        if self.idle_seconds and now - session.last_active >= self.idle_seconds:
            return f"idle for {now - session.last_active:.0f} s"
        return None


def auto_window_name(session_id: str, now: float | None = None) -> str:
    """`auto-<session prefix>-<UTC time to the microsecond>`, a valid window name."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now or time.time()))
    micros = int(((now or time.time()) % 1) * 1_000_000)
    prefix = re.sub(r"[^A-Za-z0-9._-]", "_", session_id)[:32]
    return f"auto-{prefix}-{stamp}{micros:06d}Z"
