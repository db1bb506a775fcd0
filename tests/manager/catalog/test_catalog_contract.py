"""The same contract checks against both catalogs: SQLite on a tmp dir and the Redis catalog
on a real redis-server. Whatever a window operation, freeze, thaw or housekeeping relies on
through `WindowCatalog` must mean the same with either."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cwm_client import pb
from cwm_server.manager.catalog.base import (
    ChunkRow,
    NewChunk,
    WindowCatalog,
    WindowExists,
    WindowGone,
)
from cwm_server.manager.catalog.sqlite import SqliteCatalog
from cwm_server.manager.quotas import Usage

A, B, C = (bytes([n]) * 32 for n in (1, 2, 3))


@pytest.fixture(params=["sqlite", "redis"])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[WindowCatalog]:
    if request.param == "sqlite":
        sqlite = SqliteCatalog(tmp_path / "catalog.sqlite")
        yield sqlite
        sqlite.close()
        return
    from tests.redis_helpers import REDIS_CLI, REDIS_SERVER

    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip("redis-server/redis-cli not installed")
    from cwm_server.manager.catalog.redis import RedisCatalog
    from cwm_server.manager.tiers.redis_link import RedisLink

    server = request.getfixturevalue("redis_server")
    link = RedisLink([server.url])
    yield RedisCatalog(link)
    link.close()


def _window(
    name: str,
    digests: list[bytes],
    *,
    tenant: str = "t",
    expires_at: float | None = None,
    pinned: bool = False,
    description: str = "",
    session_id: str = "",
) -> pb.WindowInfo:
    window = pb.WindowInfo(
        tenant=tenant,
        name=name,
        pinned=pinned,
        description=description,
        session_id=session_id,
        token_ids=list(range(len(digests))),
    )
    window.chunks.extend(pb.ChunkRef(digest=d) for d in digests)
    window.created_at.seconds = int(time.time())
    if expires_at is not None:
        window.expires_at.seconds = int(expires_at)
    return window


def _new(*digests: bytes) -> dict[bytes, NewChunk]:
    return {d: NewChunk(d, raw_size=1000 + d[0], stored_size=500 + d[0], codec=0) for d in digests}


def test_a_committed_window_is_visible_with_its_chunk_rows(catalog: WindowCatalog) -> None:
    assert catalog.commit_window(_window("w", [A, B, A]), _new(A, B), replace=False) == []
    full = catalog.get_window("t", "w")
    assert full is not None and [r.digest for r in full.chunks] == [A, B, A]
    basic = catalog.get_window("t", "w", full=False)
    assert basic is not None and basic.name == "w" and not basic.chunks and not basic.token_ids
    assert catalog.window_exists("t", "w")
    assert catalog.chunk("t", A) == ChunkRow(A, 2, 1001, 501, 0)
    assert catalog.chunk("t", B) == ChunkRow(B, 1, 1002, 502, 0)
    assert catalog.missing("t", [C, A, B]) == [C]
    assert catalog.has_chunk_rows("t", [A, C]) == {A}


def test_tenants_see_only_their_own_windows_and_chunks(catalog: WindowCatalog) -> None:
    catalog.commit_window(_window("w", [A]), _new(A), replace=False)
    assert catalog.get_window("other", "w") is None
    assert not catalog.window_exists("other", "w")
    assert catalog.chunk("other", A) is None
    assert catalog.missing("other", [A]) == [A]
    assert catalog.tenant_usage("other") == Usage(windows=0, chunks=0, raw_bytes=0, stored_bytes=0)


def test_a_name_taken_is_refused_unless_replaced_and_replacing_frees_only_unshared(
    catalog: WindowCatalog,
) -> None:
    catalog.commit_window(_window("w", [A, B]), _new(A, B), replace=False)
    with pytest.raises(WindowExists):
        catalog.commit_window(_window("w", [C]), _new(C), replace=False)
    freed = catalog.commit_window(_window("w", [B, C]), _new(C), replace=True)
    assert freed == [A]
    assert catalog.chunk("t", A) is None
    assert catalog.chunk("t", B) is not None and catalog.chunk("t", B).refcount == 1  # type: ignore[union-attr]
    window = catalog.get_window("t", "w")
    assert window is not None and [r.digest for r in window.chunks] == [B, C]


def test_a_clone_shares_chunks_and_deleting_one_copy_frees_nothing(
    catalog: WindowCatalog,
) -> None:
    source = _window("src", [A, B])
    catalog.commit_window(source, _new(A, B), replace=False)
    clone = _window("copy", [A, B])
    clone.parent = "src"
    assert catalog.clone_window(source, clone) == []
    assert catalog.chunk("t", A).refcount == 2  # type: ignore[union-attr]
    with pytest.raises(WindowExists):
        catalog.clone_window(source, clone)
    assert catalog.delete_window("t", "src") == []
    assert catalog.chunk("t", A).refcount == 1  # type: ignore[union-attr]
    with pytest.raises(WindowGone):
        catalog.clone_window(source, _window("again", [A, B]))
    freed = catalog.delete_window("t", "copy")
    assert freed is not None and sorted(freed) == [(A, 501), (B, 502)]
    assert catalog.missing("t", [A, B]) == [A, B]
    assert catalog.delete_window("t", "copy") is None


def test_an_expired_window_is_invisible_until_collected_and_a_pinned_one_never_expires(
    catalog: WindowCatalog,
) -> None:
    past = time.time() - 60
    catalog.commit_window(_window("old", [A], expires_at=past), _new(A), replace=False)
    catalog.commit_window(_window("kept", [B], expires_at=past, pinned=True), _new(B), False)
    assert catalog.get_window("t", "old") is None
    assert not catalog.window_exists("t", "old")
    assert catalog.window_exists("t", "old", include_expired=True)
    assert catalog.delete_window("t", "old") is None  # a delete sees no live window
    assert catalog.get_window("t", "kept") is not None
    assert catalog.expired_windows(time.time(), 10) == [("t", "old")]
    assert catalog.expired_windows(time.time(), 10, "someone-else") == []
    assert catalog.tenant_usage("t").windows == 2  # expired, not yet collected: counted
    assert catalog.delete_expired_window("t", "kept", time.time()) is None
    assert catalog.delete_expired_window("t", "old", time.time()) == [(A, 501)]
    assert not catalog.window_exists("t", "old", include_expired=True)
    assert catalog.expired_windows(time.time(), 10) == []


def test_an_expired_name_can_be_taken_again_and_its_chunks_are_freed(
    catalog: WindowCatalog,
) -> None:
    catalog.commit_window(_window("w", [A], expires_at=time.time() - 60), _new(A), False)
    assert catalog.commit_window(_window("w", [B]), _new(B), replace=False) == [A]
    window = catalog.get_window("t", "w")
    assert window is not None and [r.digest for r in window.chunks] == [B]


def test_listing_pages_by_name_and_filters(catalog: WindowCatalog) -> None:
    for name, session in (("beta", "s1"), ("alpha", "s2"), ("alpine", "s1"), ("gamma", "s1")):
        catalog.commit_window(
            _window(name, [A], session_id=session, description=f"About {name.upper()}"),
            _new(A),
            replace=False,
        )

    def names(**overrides: object) -> list[str]:
        query: dict[str, object] = {
            "after": "",
            "name_prefix": "",
            "session_id": "",
            "model_id": "",
            "search": "",
            "limit": 10,
            "full": False,
        }
        query.update(overrides)
        return [w.name for w in catalog.list_windows("t", **query)]  # type: ignore[arg-type]

    assert names() == ["alpha", "alpine", "beta", "gamma"]
    assert names(limit=2) == ["alpha", "alpine"]
    assert names(after="alpine") == ["beta", "gamma"]
    assert names(name_prefix="alp") == ["alpha", "alpine"]
    assert names(session_id="s1") == ["alpine", "beta", "gamma"]
    assert names(search="about gam") == ["gamma"]
    assert names(name_prefix="zzz") == []


def test_usage_counts_each_chunk_once(catalog: WindowCatalog) -> None:
    catalog.commit_window(_window("w1", [A, B]), _new(A, B), replace=False)
    catalog.commit_window(_window("w2", [A]), {}, replace=False)
    assert catalog.tenant_usage("t") == Usage(
        windows=2, chunks=2, raw_bytes=1001 + 1002, stored_bytes=501 + 502
    )


def test_repairs_set_a_count_and_restore_a_missing_row(catalog: WindowCatalog) -> None:
    catalog.commit_window(_window("w", [A]), _new(A), replace=False)
    catalog.set_refcount("t", A, 3)
    assert catalog.chunk("t", A).refcount == 3  # type: ignore[union-attr]
    catalog.set_refcount("t", A, 0)
    assert catalog.chunk("t", A) is None
    catalog.insert_chunk_row("t", ChunkRow(A, 1, 1001, 501, 0))
    assert catalog.chunk("t", A) == ChunkRow(A, 1, 1001, 501, 0)
    assert [(t, r.digest) for t, r in catalog.iter_chunks()] == [("t", A)]
    assert [w.name for w in catalog.iter_all_windows()] == ["w"]
