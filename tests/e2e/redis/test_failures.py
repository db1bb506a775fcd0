"""Redis failing in ways other than going away: full (`maxmemory` with `noeviction`),
refusing a command, away while a local catalog collects, and collections that could not
claim their chunks. Real redis-server processes on free loopback ports; every test checks
that nothing was left behind (catalog rows, chunk files, Redis keys)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cwm_client import WindowClient, pb
from cwm_client.errors import FailedPrecondition, NotFound, ResourceExhausted, Unavailable
from tests.helpers import FINGERPRINT, chunk_files, synthetic_chunks, token_ids
from tests.ops_helpers import health_status, wait_for
from tests.redis_helpers import (
    RedisManager,
    RedisServer,
    catalog_audit,
    needs_redis,
    redis_config,
    thawed,
)

pytestmark = needs_redis

MiB = 1 << 20


def _fill_redis_after(server: RedisServer, room_bytes: int) -> None:
    """Let Redis take about `room_bytes` more, then refuse writes (OOM, noeviction)."""
    client = server.client()
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", str(used + room_bytes))


def _fill_redis_up(server: RedisServer) -> int:
    """Write filler keys until Redis refuses even small writes; returns how many."""
    client = server.client()
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", str(used + MiB))
    count = 0
    while True:
        try:
            client.set(f"filler:{count}", b"x" * 65536)
        except Exception:  # noqa: BLE001 - OOM: full
            return count
        count += 1


# -- 1. a full Redis ----------------------------------------------------------------------


def test_full_redis_refuses_a_fleet_freeze_and_leaves_nothing(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Fleet mode needs Redis for every chunk: a freeze that fills it answers
    RESOURCE_EXHAUSTED (REDIS_FULL), not INTERNAL, and its clean-up (which must claim the
    chunks while Redis is still full) leaves no row, no chunk key and no chunk file."""
    manager = RedisManager(redis_config(tmp_path / "m", redis_server.url))
    chunks = synthetic_chunks(256 * 8, seed=31)  # 8 chunks of 1 MiB
    try:
        with WindowClient(manager.target) as client:
            client.freeze(
                "small",
                synthetic_chunks(300, seed=30),
                fingerprint=FINGERPRINT,
                token_ids=token_ids(300),
            )
            before = catalog_audit(redis_server.client())
            _fill_redis_after(redis_server, 3 * MiB)
            with pytest.raises(ResourceExhausted) as caught:
                client.freeze("big", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(256 * 8))
            assert caught.value.reason == "REDIS_FULL", caught.value
            assert "full" in str(caught.value) and "maxmemory" in str(caught.value)
            # Nothing of the refused freeze stayed anywhere (clean-up ran while full).
            wait_for(
                lambda: catalog_audit(redis_server.client())["chunk_keys"] == before["chunk_keys"],
                what="the refused freeze's chunk keys deleted",
            )
            audit = catalog_audit(redis_server.client())
            assert audit["windows"] == {"small"}
            assert audit["refs"] == audit["expected"] == before["refs"]
            assert audit["info_keys"] == before["info_keys"]
            assert audit["dying"] == {}
            assert len(chunk_files(tmp_path / "m")) == len(before["chunk_keys"])
            # The component says why; the manager itself serves.
            wait_for(
                lambda: health_status(manager.target, "cwm.tier.redis")[0] == "NOT_SERVING",
                what="redis component degraded",
            )
            detail = health_status(manager.target, "cwm.tier.redis")[1]["cwm-health-detail"]
            assert "REDIS_FULL" in detail
            assert health_status(manager.target, "")[0] == "SERVING"
            # Redis so full that even the clean-up's small catalog writes (the claim) hit
            # maxmemory: the refused freeze still removes its chunk files at once.
            fillers = _fill_redis_up(redis_server)
            files = len(chunk_files(tmp_path / "m"))
            with pytest.raises(ResourceExhausted) as caught:
                client.freeze("big", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(256 * 8))
            assert caught.value.reason == "REDIS_FULL"
            assert len(chunk_files(tmp_path / "m")) == files
            audit = catalog_audit(redis_server.client())
            assert audit["chunk_keys"] == before["chunk_keys"] and audit["dying"] == {}
            assert manager.manager.collector.unclaimed() == set()
            # Reads and deletes still work on a full Redis; with room again, freezes do.
            assert thawed(client, "small") == [c.data() for c in synthetic_chunks(300, seed=30)]
            redis_server.client().delete(*[f"filler:{i}" for i in range(fillers)])
            redis_server.client().config_set("maxmemory", "0")
            client.freeze("big", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(256 * 8))
            assert thawed(client, "big") == [c.data() for c in chunks]
    finally:
        manager.stop()


def test_full_redis_skips_the_copy_in_write_through(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """With a local catalog, Redis is a best-effort copy: a full Redis costs the copy
    (logged, counted, reported by the health check), never the freeze."""
    manager = RedisManager(
        redis_config(tmp_path / "m", redis_server.url, redis_catalog=False, memory_cache_bytes=0)
    )
    chunks = synthetic_chunks(256 * 6, seed=32)
    try:
        with WindowClient(manager.target) as client:
            _fill_redis_after(redis_server, 2 * MiB)
            client.freeze("w", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(256 * 6))
            assert manager.manager.store.redis_skips > 0
            skipped = manager.server.metrics.registry.get_sample_value(
                "cwm_redis_copies_skipped_total", {"reason": "REDIS_FULL"}
            )
            assert skipped == manager.manager.store.redis_skips
            # The chunks are all on disk; Redis holds whole copies of some at most.
            assert len(chunk_files(tmp_path / "m")) == len(chunks)
            audit = catalog_audit(redis_server.client())
            assert audit["chunk_keys"] == audit["info_keys"]
            assert len(audit["chunk_keys"]) < len(chunks)
            assert thawed(client, "w") == [c.data() for c in chunks]
            wait_for(
                lambda: health_status(manager.target, "cwm.tier.redis")[0] == "NOT_SERVING",
                what="redis component degraded",
            )
            detail = health_status(manager.target, "cwm.tier.redis")[1]["cwm-health-detail"]
            assert "REDIS_FULL" in detail and "disk only" in detail
            # A delete on a full Redis still removes every copy.
            client.delete("w")
            assert chunk_files(tmp_path / "m") == []
            assert catalog_audit(redis_server.client())["chunk_keys"] == set()
    finally:
        manager.stop()


def test_a_refused_command_is_a_precise_status(tmp_path: Path, redis_server: RedisServer) -> None:
    """Another program's key of the wrong type under the manager's prefix: Redis answers
    WRONGTYPE, the client gets FAILED_PRECONDITION (REDIS_REFUSED), not INTERNAL."""
    manager = RedisManager(redis_config(tmp_path / "m", redis_server.url))
    try:
        redis_server.client().set("cwm:cat:{default}:names", b"not a sorted set")
        with WindowClient(manager.target) as client:
            with pytest.raises(FailedPrecondition) as caught:
                list(client.list())
            assert caught.value.reason == "REDIS_REFUSED"
            assert "WRONGTYPE" in str(caught.value)
            # Not an outage: the breaker stays closed, other calls go on.
            with pytest.raises(NotFound):
                client.get("absent")
    finally:
        manager.stop()


# -- 2. collection with a local catalog while Redis is away --------------------------------


def test_delete_with_local_catalog_while_redis_is_down(tmp_path: Path) -> None:
    """The delete commits in SQLite: it answers OK, every chunk file of the window goes at
    once, and the Redis copies are deleted when Redis is back (listed in the catalog
    meanwhile, so a restart of the manager would not forget them)."""
    redis_server = RedisServer(tmp_path / "redis", persist=True).start()
    manager = RedisManager(redis_config(tmp_path / "m", redis_server.url, redis_catalog=False))
    w0 = synthetic_chunks(512, seed=40)
    w1 = synthetic_chunks(512, seed=41)
    try:
        with WindowClient(manager.target) as client:
            client.freeze("w0", w0, fingerprint=FINGERPRINT, token_ids=token_ids(512, 0))
            client.freeze("w1", w1, fingerprint=FINGERPRINT, token_ids=token_ids(512, 1))
            assert catalog_audit(redis_server.client())["chunk_keys"] == {c.digest for c in w0 + w1}
            redis_server.kill()

            deleted = client.delete("w0")
            assert deleted is not None
            with pytest.raises(NotFound):
                client.get("w0")
            assert len(chunk_files(tmp_path / "m")) == len(w1)  # w0's files all gone
            catalog = manager.manager.catalog
            pending = manager._run(manager.manager.db(catalog.redis_pending))
            assert {d for _, d in pending} == {c.digest for c in w0}
            assert thawed(client, "w1") == [c.data() for c in w1]

            redis_server.start()
            wait_for(
                lambda: (
                    catalog_audit(redis_server.client())["chunk_keys"] == {c.digest for c in w1}
                ),
                timeout=15,
                what="w0's Redis copies deleted once Redis is back",
            )
            audit = catalog_audit(redis_server.client())
            assert audit["info_keys"] == {c.digest for c in w1}
            wait_for(
                lambda: manager._run(manager.manager.db(catalog.redis_pending)) == [],
                what="pending list emptied",
            )
            assert thawed(client, "w1") == [c.data() for c in w1]
    finally:
        manager.stop()
        redis_server.stop()


def test_pending_redis_deletes_spare_a_chunk_frozen_again(tmp_path: Path) -> None:
    """A chunk collected while Redis was away and frozen again before it came back keeps
    its Redis copy: the pending delete is dropped, not done."""
    redis_server = RedisServer(tmp_path / "redis", persist=True).start()
    manager = RedisManager(redis_config(tmp_path / "m", redis_server.url, redis_catalog=False))
    chunks = synthetic_chunks(512, seed=42)
    try:
        with WindowClient(manager.target) as client:
            client.freeze("a", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(512))
            redis_server.kill()
            client.delete("a")
            client.freeze("b", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(512))
            redis_server.start()
            catalog = manager.manager.catalog
            wait_for(
                lambda: manager._run(manager.manager.db(catalog.redis_pending)) == [],
                timeout=15,
                what="pending list settled",
            )
            assert catalog_audit(redis_server.client())["chunk_keys"] == {c.digest for c in chunks}
            assert thawed(client, "b") == [c.data() for c in chunks]
    finally:
        manager.stop()
        redis_server.stop()


# -- 4. deferred collection (Redis copies too) ---------------------------------------------


def test_delete_during_a_thaw_collects_redis_copies_with_a_local_catalog(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """SQLite catalog + Redis copies: a window deleted while a thaw streams it keeps its
    chunks for the stream; when the stream ends the files and the Redis copies go."""
    manager = RedisManager(redis_config(tmp_path / "m", redis_server.url, redis_catalog=False))
    chunks = synthetic_chunks(256 * 12, seed=43)
    try:
        with WindowClient(manager.target) as client:
            client.freeze("w", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(256 * 12))
            with client.thaw("w", streams=1) as stream:
                received = iter(stream)
                first = bytes(next(received).data)
                client.delete("w")
                rest = [bytes(c.data) for c in received]
            assert [first, *rest] == [c.data() for c in chunks]
            wait_for(
                lambda: (
                    chunk_files(tmp_path / "m") == []
                    and catalog_audit(redis_server.client())["chunk_keys"] == set()
                ),
                what="files and Redis copies collected after the stream",
            )
    finally:
        manager.stop()


# -- 5. a shared-catalog collection that could not claim -----------------------------------


def test_unclaimed_chunks_are_collected_by_the_sweep(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fleet mode: the delete commits but claiming its chunks fails (Redis lost between
    the two scripts). The manager remembers them and its periodic sweep collects them."""
    from cwm_server.manager.housekeeping import sweeper

    monkeypatch.setattr(sweeper, "CLAIM_SWEEP_EVERY_S", 0.3)
    manager = RedisManager(redis_config(tmp_path / "m", redis_server.url))
    chunks = synthetic_chunks(512, seed=44)
    try:
        with WindowClient(manager.target) as client:
            client.freeze("w", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(512))
            catalog = manager.manager.catalog
            real_claim = catalog.claim_unreferenced
            failures = []

            def failing_claim(tenant: str, digests: object) -> list[bytes]:
                if not failures:
                    failures.append(tenant)
                    raise Unavailable("lost Redis", reason="REDIS_UNAVAILABLE")
                return real_claim(tenant, digests)  # type: ignore[arg-type]

            monkeypatch.setattr(catalog, "claim_unreferenced", failing_claim)
            client.delete("w")
            assert failures == ["default"]
            wait_for(
                lambda: catalog_audit(redis_server.client())["chunk_keys"] == set(),
                timeout=15,
                what="the sweep collected the unclaimed chunks",
            )
            audit = catalog_audit(redis_server.client())
            assert audit["refs"] == {} and audit["dying"] == {} and audit["info_keys"] == set()
            assert chunk_files(tmp_path / "m") == []
    finally:
        manager.stop()


# -- 3. collect_expired(tenant) looks at that tenant only ------------------------------------


def _expired_window(tenant: str, name: str, expired_at: float) -> pb.WindowInfo:
    window = pb.WindowInfo(tenant=tenant, name=name)
    window.expires_at.seconds = int(expired_at)
    return window


def test_redis_catalog_expired_windows_of_one_tenant(redis_server: RedisServer) -> None:
    """Other tenants' windows that expired earlier do not hide this tenant's."""
    from cwm_server.manager.catalog.redis import RedisCatalog
    from cwm_server.manager.tiers.redis_link import RedisLink

    link = RedisLink([redis_server.url])
    catalog = RedisCatalog(link)
    now = time.time()
    try:
        for i in range(5):
            catalog.commit_window(_expired_window("bob", f"b{i}", now - 200 - i), {}, False)
        catalog.commit_window(_expired_window("alice", "a", now - 100), {}, False)
        assert catalog.expired_windows(now, 3, "alice") == [("alice", "a")]
        assert catalog.expired_windows(now, 3, "carol") == []
        everyone = catalog.expired_windows(now, 100)
        assert len(everyone) == 6 and ("alice", "a") in everyone
        assert [t for t, _ in catalog.expired_windows(now, 3)] == ["bob"] * 3
    finally:
        link.close()


def test_documented_cleanup_of_a_lost_delete_reply(
    tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A delete whose reply was lost leaves its freed chunks' bytes in Redis (no one knows
    what it freed). The manual clean-up in OPERATIONS.md reclaims exactly those,
    and never a chunk a window uses."""
    import re

    from cwm_server.manager.catalog.redis import RedisCatalog
    from cwm_server.manager.tiers.redis_link import RedisLink
    from tests.helpers import ROOT

    manager = RedisManager(redis_config(tmp_path / "m", redis_server.url))
    kept = synthetic_chunks(512, seed=45)
    lost = synthetic_chunks(512, seed=46)
    try:
        with WindowClient(manager.target) as client:
            client.freeze("kept", kept, fingerprint=FINGERPRINT, token_ids=token_ids(512))
            client.freeze("lost", lost, fingerprint=FINGERPRINT, token_ids=token_ids(512))
            link = RedisLink([redis_server.url])
            try:  # the delete script ran; its caller never learnt what it freed
                assert RedisCatalog(link).delete_window("default", "lost")
            finally:
                link.close()
            assert catalog_audit(redis_server.client())["chunk_keys"] == {
                c.digest for c in kept + lost
            }
            text = (ROOT / "docs" / "OPERATIONS.md").read_text()
            section = text[text.index("**Chunks freed by a delete whose outcome") :]
            found = re.search(r"```python\n(.*?)```", section, re.S)
            assert found is not None
            source = found.group(1).replace("redis://10.0.0.9:6379", redis_server.url)
            exec(compile(source, "OPERATIONS.md", "exec"), {})
            assert "default 2 chunks reclaimed" in capsys.readouterr().out
            audit = catalog_audit(redis_server.client())
            assert audit["chunk_keys"] == audit["info_keys"] == {c.digest for c in kept}
            assert audit["refs"] == audit["expected"] and audit["dying"] == {}
            assert thawed(client, "kept") == [c.data() for c in kept]
    finally:
        manager.stop()


def test_the_orphan_sweep_collects_what_a_lost_delete_reply_leaked(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same leak, collected by the manager itself: its rare orphan sweep sees chunk
    keys without a catalog row, and once they stayed so for the grace period it collects
    them through the claim; chunks a window uses stay."""
    from cwm_server.manager.catalog.redis import RedisCatalog
    from cwm_server.manager.housekeeping import collector, sweeper
    from cwm_server.manager.tiers.redis_link import RedisLink

    monkeypatch.setattr(sweeper, "ORPHAN_SWEEP_EVERY_S", 0.2)
    monkeypatch.setattr(collector, "ORPHAN_GRACE_S", 0.5)
    manager = RedisManager(redis_config(tmp_path / "m", redis_server.url))
    kept = synthetic_chunks(512, seed=47)
    lost = synthetic_chunks(512, seed=48)
    try:
        with WindowClient(manager.target) as client:
            client.freeze("kept", kept, fingerprint=FINGERPRINT, token_ids=token_ids(512))
            client.freeze("lost", lost, fingerprint=FINGERPRINT, token_ids=token_ids(512))
            link = RedisLink([redis_server.url])
            try:
                assert RedisCatalog(link).delete_window("default", "lost")
            finally:
                link.close()
            wait_for(
                lambda: (
                    catalog_audit(redis_server.client())["chunk_keys"] == {c.digest for c in kept}
                ),
                timeout=15,
                what="the orphan sweep collected the leaked chunks",
            )
            audit = catalog_audit(redis_server.client())
            assert audit["info_keys"] == {c.digest for c in kept}
            assert audit["refs"] == audit["expected"] and audit["dying"] == {}
            assert len(chunk_files(tmp_path / "m")) == len(kept)
            assert thawed(client, "kept") == [c.data() for c in kept]
    finally:
        manager.stop()
