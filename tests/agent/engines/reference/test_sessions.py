"""The reference engine's session table: least recently used sessions go first, as in a
serving engine, and a session that failed mid-forward is forgotten without touching a newer
one under the same salt."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from transformers import DynamicCache

from cwm_server.agent.engines.reference.sessions import (
    Session,
    SessionNotFound,
    SessionTable,
    common_prefix,
)


def table(max_sessions: int) -> SessionTable:
    return SessionTable(DynamicCache, max_sessions)


def test_the_least_recently_used_session_is_evicted_first() -> None:
    sessions = table(2)
    sessions.get_or_create("a")
    sessions.get_or_create("b")
    sessions.get_or_create("a")  # a is now the most recently used
    sessions.get_or_create("c")
    assert [info.cache_salt for info in sessions.infos()] == ["a", "c"]
    with pytest.raises(SessionNotFound):
        sessions.require("b")


def test_get_or_create_returns_the_same_session_until_it_is_dropped() -> None:
    sessions = table(4)
    first = sessions.get_or_create("a")
    first.tokens.extend([1, 2, 3])
    assert sessions.get_or_create("a") is first
    assert sessions.infos()[0].num_tokens == 3
    assert sessions.drop("a") is True
    assert sessions.drop("a") is False
    assert sessions.get_or_create("a") is not first


def test_storing_replaces_the_salts_session_and_counts_towards_the_limit() -> None:
    sessions = table(1)
    sessions.get_or_create("a")
    imported = Session(cache=DynamicCache(), tokens=[5, 6])
    sessions.store("b", imported)
    assert sessions.require("b") is imported
    assert [info.cache_salt for info in sessions.infos()] == ["b"]


def test_discarding_a_stale_session_leaves_a_newer_one_alone() -> None:
    sessions = table(4)
    stale = sessions.get_or_create("a")
    newer = Session(cache=DynamicCache())
    sessions.store("a", newer)
    sessions.discard("a", stale)
    assert sessions.require("a") is newer
    sessions.discard("a", newer)
    with pytest.raises(SessionNotFound):
        sessions.require("a")


def test_a_table_holds_at_least_one_session() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        table(0)


@pytest.mark.parametrize(
    ("a", "b", "shared"),
    [([], [1], 0), ([1, 2, 3], [1, 2, 3], 3), ([1, 2, 3], [1, 2], 2), ([1, 2], [1, 3], 1)],
)
def test_common_prefix_counts_the_leading_tokens_both_share(
    a: list[int], b: list[int], shared: int
) -> None:
    assert common_prefix(a, b) == shared
