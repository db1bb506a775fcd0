"""Redis goes away under a running manager (SIGKILL of redis-server) and comes back.

While it is gone the manager serves what its local tiers hold (a thaw of a window it froze
itself), answers whatever needs Redis with UNAVAILABLE in well under a second, and reports
itself degraded (services SERVING, `cwm.tier.redis` NOT_SERVING; `cwm status` says
degraded). When redis-server restarts on the same port (append-only file, fsync always) the
manager is healthy again by itself and new work succeeds."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cwm_client import WindowClient
from cwm_client.errors import Unavailable
from tests.helpers import FINGERPRINT, ROOT, synthetic_chunks, token_ids
from tests.ops_helpers import health_status, wait_for
from tests.redis_helpers import RedisManager, RedisServer, needs_redis, redis_config, thawed

pytestmark = needs_redis


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", persist=True).start()
    yield server
    server.stop()


def _unavailable_fast(call: Callable[[], object]) -> float:
    started = time.monotonic()
    with pytest.raises(Unavailable) as caught:
        call()
    elapsed = time.monotonic() - started
    assert caught.value.reason == "REDIS_UNAVAILABLE", caught.value
    assert "Redis" in str(caught.value)
    assert elapsed < 1.0, f"UNAVAILABLE took {elapsed:.3f} s"
    return elapsed


def _cwm_status(target: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "cwm_server.cli.main", "status", "--json", "--manager", target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report: dict[str, object] = json.loads(done.stdout)
    return report


def test_redis_killed_and_restarted_under_a_manager(
    tmp_path: Path, persistent_redis: RedisServer
) -> None:
    # Memory tier off: the local reads below come from the disk.
    config = redis_config(tmp_path / "m1", persistent_redis.url, memory_cache_bytes=0)
    manager = RedisManager(config)
    other = RedisManager(redis_config(tmp_path / "m2", persistent_redis.url))
    target = manager.target
    local = synthetic_chunks(600, seed=1)
    remote = synthetic_chunks(300, seed=2)
    try:
        with WindowClient(target) as client, WindowClient(other.target) as peer:
            client.freeze("local", local, fingerprint=FINGERPRINT, token_ids=token_ids(600))
            peer.freeze("remote", remote, fingerprint=FINGERPRINT, token_ids=token_ids(300))
            assert health_status(target, "cwm.tier.redis")[0] == "SERVING"

            persistent_redis.kill()  # SIGKILL

            # What the local tiers hold is still served, byte for byte.
            assert thawed(client, "local") == [c.data() for c in local]
            # What needs Redis answers UNAVAILABLE at once.
            _unavailable_fast(lambda: list(client.list()))
            _unavailable_fast(lambda: client.get("remote"))
            _unavailable_fast(lambda: thawed(client, "remote"))
            _unavailable_fast(lambda: client.clone("local", "local-2"))
            _unavailable_fast(lambda: client.delete("local"))
            _unavailable_fast(
                lambda: client.freeze(
                    "new", synthetic_chunks(10), fingerprint=FINGERPRINT, token_ids=token_ids(10)
                )
            )
            # ... and keeps doing so (the breaker, then each retry, stays fast).
            for _ in range(3):
                _unavailable_fast(lambda: client.find_missing([local[0].digest]))
            # The local thaw still works after the failures.
            assert thawed(client, "local") == [c.data() for c in local]

            # Degraded, not down: the services serve, the Redis component does not.
            wait_for(
                lambda: health_status(target, "cwm.tier.redis")[0] == "NOT_SERVING",
                what="redis degraded",
            )
            _, trailing = health_status(target, "cwm.tier.redis")
            assert "unreachable" in trailing["cwm-health-detail"]
            for service in ("", "cwm.v1.WindowService"):
                assert health_status(target, service)[0] == "SERVING"
            report = _cwm_status(target)
            assert report["state"] == "degraded"
            components = report["components"]
            assert isinstance(components, dict)
            assert components["cwm.tier.redis"]["status"] == "NOT_SERVING"

            # Redis comes back on the same port with its data (append-only file).
            persistent_redis.start()
            wait_for(
                lambda: health_status(target, "cwm.tier.redis")[0] == "SERVING",
                timeout=15,
                what="redis back",
            )
            assert _cwm_status(target)["state"] == "serving"
            assert {w.name for w in client.list()} == {"local", "remote"}
            assert thawed(client, "remote") == [c.data() for c in remote]
            fresh = synthetic_chunks(300, seed=3)
            client.freeze("after", fresh, fingerprint=FINGERPRINT, token_ids=token_ids(300))
            client.clone("local", "local-2")
            assert thawed(peer, "after") == [c.data() for c in fresh]
            assert thawed(peer, "local-2") == [c.data() for c in local]
    finally:
        manager.stop()
        other.stop()


def test_a_manager_starts_while_redis_is_down_and_recovers(tmp_path: Path) -> None:
    """A manager started before its Redis serves (degraded), then heals when Redis starts."""
    redis_server = RedisServer(tmp_path / "redis")
    manager = RedisManager(redis_config(tmp_path / "m", redis_server.url))
    try:
        assert health_status(manager.target, "cwm.tier.redis")[0] == "NOT_SERVING"
        assert health_status(manager.target, "")[0] == "SERVING"
        with WindowClient(manager.target) as client:
            _unavailable_fast(lambda: list(client.list()))
            redis_server.start()
            wait_for(
                lambda: health_status(manager.target, "cwm.tier.redis")[0] == "SERVING",
                timeout=15,
                what="redis up",
            )
            chunks = synthetic_chunks(300)
            client.freeze("w", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(300))
            assert thawed(client, "w") == [c.data() for c in chunks]
    finally:
        manager.stop()
        redis_server.stop()


def test_a_redis_that_stops_answering_times_out_fast(tmp_path: Path) -> None:
    """SIGSTOP: connections still open, nothing answers. Socket timeouts (0.5 s) and the
    breaker keep every call that needs Redis under a second; SIGCONT heals it."""
    import signal

    redis_server = RedisServer(tmp_path / "redis").start()
    manager = RedisManager(redis_config(tmp_path / "m", redis_server.url))
    chunks = synthetic_chunks(300, seed=4)
    try:
        with WindowClient(manager.target) as client:
            client.freeze("kept", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(300))
            assert redis_server.proc is not None
            redis_server.proc.send_signal(signal.SIGSTOP)
            try:
                _unavailable_fast(lambda: list(client.list()))
                _unavailable_fast(lambda: client.delete("kept"))
                _unavailable_fast(lambda: client.clone("kept", "kept-2"))
                wait_for(
                    lambda: health_status(manager.target, "cwm.tier.redis")[0] == "NOT_SERVING",
                    what="redis degraded",
                )
                # The window this manager froze is still thawed from its own tiers.
                assert thawed(client, "kept") == [c.data() for c in chunks]
            finally:
                redis_server.proc.send_signal(signal.SIGCONT)
            wait_for(
                lambda: health_status(manager.target, "cwm.tier.redis")[0] == "SERVING",
                timeout=15,
                what="redis answering again",
            )
            client.clone("kept", "kept-2")
            assert {w.name for w in client.list()} == {"kept", "kept-2"}
    finally:
        manager.stop()
        redis_server.stop()


def test_expired_windows_are_collected_from_the_shared_catalog(tmp_path: Path) -> None:
    """TTLs work in fleet mode: an expired window is invisible at once, and the TTL
    collector deletes it and its chunks from Redis."""
    from tests.redis_helpers import catalog_audit

    redis_server = RedisServer(tmp_path / "redis").start()
    manager = RedisManager(redis_config(tmp_path / "m", redis_server.url, ttl_interval_s=0.2))
    try:
        with WindowClient(manager.target) as client:
            client.freeze(
                "brief",
                synthetic_chunks(300, seed=6),
                fingerprint=FINGERPRINT,
                token_ids=token_ids(300),
                ttl_seconds=1,
            )
            client.freeze(
                "lasting", synthetic_chunks(300), fingerprint=FINGERPRINT, token_ids=token_ids(300)
            )
            assert {w.name for w in client.list()} == {"brief", "lasting"}
            wait_for(
                lambda: catalog_audit(redis_server.client())["windows"] == {"lasting"},
                timeout=15,
                what="expired window collected",
            )
            assert [w.name for w in client.list()] == ["lasting"]
            audit = catalog_audit(redis_server.client())
            assert audit["refs"] == audit["expected"]
            assert audit["chunk_keys"] == set(audit["refs"])
    finally:
        manager.stop()
        redis_server.stop()


def test_a_cluster_node_killed_and_restarted(tmp_path: Path) -> None:
    """One master of a 3-master cluster dies (SIGKILL): the manager turns degraded and
    answers UNAVAILABLE fast for what that master holds; the node restarts with its data
    (append-only files) and the manager is healthy again with every window intact."""
    from tests.redis_helpers import RedisClusterProcs

    cluster = RedisClusterProcs(tmp_path / "cluster", persist=True).start()
    manager = RedisManager(redis_config(tmp_path / "m", cluster.urls, memory_cache_bytes=0))
    chunks = synthetic_chunks(256 * 12, chunk_tokens=16, seed=21)
    try:
        with WindowClient(manager.target) as client:
            client.freeze(
                "w",
                chunks,
                fingerprint=FINGERPRINT,
                token_ids=token_ids(256 * 12),
                chunk_tokens=16,
            )
            cluster.nodes[1].kill()
            # The window's chunks live on every master: a freeze needs the dead one.
            fresh = synthetic_chunks(256 * 12, chunk_tokens=16, seed=22)
            _unavailable_fast(
                lambda: client.freeze(
                    "x",
                    fresh,
                    fingerprint=FINGERPRINT,
                    token_ids=token_ids(256 * 12),
                    chunk_tokens=16,
                )
            )
            wait_for(
                lambda: health_status(manager.target, "cwm.tier.redis")[0] == "NOT_SERVING",
                what="degraded",
            )
            assert health_status(manager.target, "")[0] == "SERVING"
            # This manager froze "w": its disk still serves it.
            assert thawed(client, "w") == [c.data() for c in chunks]
            cluster.nodes[1].start()
            wait_for(
                lambda: health_status(manager.target, "cwm.tier.redis")[0] == "SERVING",
                timeout=30,
                what="cluster whole again",
            )
            client.freeze(
                "x", fresh, fingerprint=FINGERPRINT, token_ids=token_ids(256 * 12), chunk_tokens=16
            )
            assert {w.name for w in client.list()} == {"w", "x"}
            assert thawed(client, "x") == [c.data() for c in fresh]
    finally:
        manager.stop()
        cluster.stop()


def test_a_redis_that_comes_back_empty_is_reported_as_a_reset_catalog(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Redis restarted without persistence (here: flushed) serves an empty catalog: the
    fleet's managers say so in health and `cwm status`, instead of serving on as if
    nothing happened."""
    import redis as redis_py

    manager = RedisManager(redis_config(tmp_path / "m", redis_server.url))
    try:
        with WindowClient(manager.target) as client:
            client.freeze(
                "w",
                synthetic_chunks(256, seed=1),
                fingerprint=FINGERPRINT,
                token_ids=token_ids(256),
            )
        wait_for(lambda: health_status(manager.target, "cwm.tier.redis")[0] == "SERVING")
        redis_py.Redis.from_url(redis_server.url).flushall()
        wait_for(lambda: health_status(manager.target, "cwm.tier.redis")[0] == "NOT_SERVING")
        _, trailing = health_status(manager.target, "cwm.tier.redis")
        assert "was reset" in trailing["cwm-health-detail"]
        time.sleep(0.5)  # it stays reported, check after check
        assert health_status(manager.target, "cwm.tier.redis")[0] == "NOT_SERVING"
    finally:
        manager.stop()
