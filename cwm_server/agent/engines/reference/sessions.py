"""The reference engine's live sessions: one KV cache per cache_salt, least recently used
evicted first, as a serving engine evicts under memory pressure.

The table does no locking of its own: the engine holds its lock around every use, because a
session's KV and its token list must change together with the model's forward pass.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from transformers import DynamicCache

DEFAULT_MAX_SESSIONS = 256


class SessionNotFound(KeyError):
    """No live session has this cache_salt."""


@dataclass(frozen=True)
class SessionInfo:
    """What the agent reports about a live session."""

    cache_salt: str
    num_tokens: int  # tokens whose KV the session holds
    last_active: float  # time.time() of the last request or import


@dataclass
class Session:
    """A KV cache and exactly the tokens it covers, position i holding token i."""

    cache: DynamicCache
    tokens: list[int] = field(default_factory=list)
    last_active: float = field(default_factory=time.time)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    limit = min(len(a), len(b))
    for i in range(limit):
        if a[i] != b[i]:
            return i
    return limit


class SessionTable:
    """Sessions by cache_salt, least recently used first."""

    def __init__(self, new_cache: Callable[[], DynamicCache], max_sessions: int) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self._new_cache = new_cache
        self._max_sessions = max_sessions
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def get_or_create(self, cache_salt: str) -> Session:
        """The salt's session, created empty on first use, now the most recently used."""
        session = self._sessions.get(cache_salt)
        if session is None:
            session = Session(cache=self._new_cache())
            self.store(cache_salt, session)
        else:
            self._sessions.move_to_end(cache_salt)
        return session

    def store(self, cache_salt: str, session: Session) -> None:
        """Make `session` the salt's (replacing any), evicting the least recently used."""
        self._sessions[cache_salt] = session
        self._sessions.move_to_end(cache_salt)
        while len(self._sessions) > self._max_sessions:
            self._sessions.popitem(last=False)  # evict the least recently used, like an engine

    def require(self, cache_salt: str) -> Session:
        session = self._sessions.get(cache_salt)
        if session is None:
            raise SessionNotFound(cache_salt)
        return session

    def discard(self, cache_salt: str, session: Session) -> None:
        """Forget the salt's session if it is still `session` (one that can no longer be
        trusted), leaving a newer one alone."""
        if self._sessions.get(cache_salt) is session:
            del self._sessions[cache_salt]

    def drop(self, cache_salt: str) -> bool:
        """Forget a session and free its KV; False when there was none."""
        return self._sessions.pop(cache_salt, None) is not None

    def infos(self) -> list[SessionInfo]:
        return [
            SessionInfo(salt, len(session.tokens), session.last_active)
            for salt, session in self._sessions.items()
        ]
