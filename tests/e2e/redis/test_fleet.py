"""Fleet mode: several managers on one Redis (and on a 3-master Redis Cluster) serve the same
windows through the shared catalog, and concurrent clones, deletes and re-freezes through
different managers never lose or leak a chunk. Real redis-server processes on free loopback
ports; real managers on ephemeral gRPC ports."""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.cluster import ClusterNode, RedisCluster

from cwm_client import WindowClient, chunks_from_bytes, pb
from cwm_client.errors import AlreadyExists, FailedPrecondition, NotFound
from tests.helpers import FINGERPRINT, chunk_files, synthetic_chunks, token_ids
from tests.redis_helpers import (
    RedisClusterProcs,
    RedisManager,
    RedisServer,
    catalog_audit,
    needs_redis,
    redis_config,
    thawed,
)

pytestmark = needs_redis


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcs]:
    cluster = RedisClusterProcs(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


def _two_managers(tmp_path: Path, urls: list[str] | str) -> tuple[RedisManager, RedisManager]:
    """Manager 1 writes through to its disk; manager 2 is stateless (redis-only: no chunk
    files, Redis is its durable tier)."""
    first = RedisManager(redis_config(tmp_path / "m1", urls))
    second = RedisManager(redis_config(tmp_path / "m2", urls, redis_policy="redis-only"))
    return first, second


def _share_and_delete(tmp_path: Path, urls: list[str] | str, chunk_tokens: int, tokens: int):
    """Freeze through manager 1; list, clone, thaw through manager 2; delete through each
    and see it through the other. Returns the window's chunks (for layout checks)."""
    first, second = _two_managers(tmp_path, urls)
    chunks = synthetic_chunks(tokens, chunk_tokens=chunk_tokens, seed=7)
    expected = [c.data() for c in chunks]
    try:
        with WindowClient(first.target) as one, WindowClient(second.target) as two:
            one.freeze(
                "shared",
                chunks,
                fingerprint=FINGERPRINT,
                token_ids=token_ids(tokens),
                chunk_tokens=chunk_tokens,
                description="frozen through manager 1",
            )
            assert [w.name for w in two.list()] == ["shared"]
            assert two.get("shared").description == "frozen through manager 1"
            # Manager 2 knows the chunks are stored: an incremental freeze sends nothing.
            assert two.find_missing([c.digest for c in chunks]) == []
            two.clone("shared", "branch")
            assert thawed(two, "branch") == expected
            assert thawed(two, "shared") == expected
            assert chunk_files(tmp_path / "m2") == []  # stateless: read from Redis
            assert {w.name for w in one.list()} == {"shared", "branch"}
            assert thawed(one, "branch") == expected

            one.delete("shared")
            with pytest.raises(NotFound):
                two.get("shared")
            with pytest.raises(NotFound):
                thawed(two, "shared")
            assert thawed(two, "branch") == expected  # the clone keeps every chunk

            # A window frozen through the stateless manager is served by the other.
            more = synthetic_chunks(300, seed=8)
            two.freeze("from-two", more, fingerprint=FINGERPRINT, token_ids=token_ids(300))
            assert chunk_files(tmp_path / "m2") == []
            assert thawed(one, "from-two") == [c.data() for c in more]

            two.delete("branch")
            with pytest.raises(NotFound):
                one.get("branch")
            one.delete("from-two")
            assert list(one.list()) == [] and list(two.list()) == []
    finally:
        first.stop()
        second.stop()
    return chunks


def test_two_managers_share_windows_on_one_redis(tmp_path: Path, redis_server: RedisServer):
    _share_and_delete(tmp_path, redis_server.url, chunk_tokens=256, tokens=700)
    audit = catalog_audit(redis_server.client())
    assert audit["windows"] == set()
    assert audit["refs"] == {} and audit["meta"] == set() and audit["dying"] == {}
    assert audit["chunk_keys"] == set() == audit["info_keys"]  # collected from Redis too


def test_two_managers_share_windows_on_a_redis_cluster(
    tmp_path: Path, redis_cluster: RedisClusterProcs
):
    first, second = _two_managers(tmp_path, redis_cluster.urls)
    # 48 chunks of 16 tokens: each chunk key has its own hash tag (tenant + digest).
    chunks = synthetic_chunks(768, chunk_tokens=16, seed=3)
    try:
        with WindowClient(first.target) as one, WindowClient(second.target) as two:
            one.freeze(
                "spread",
                chunks,
                fingerprint=FINGERPRINT,
                token_ids=token_ids(768),
                chunk_tokens=16,
            )
            per_node = redis_cluster.keys_per_node("cwm:chunk:*")
            assert sum(per_node) == len({c.digest for c in chunks})
            assert all(count > 0 for count in per_node), per_node  # every master holds some
            # The tenant's catalog shares one slot (one Lua script commits it).
            node = redis_cluster.nodes[0].client()
            slots = {
                node.execute_command("CLUSTER KEYSLOT", f"cwm:cat:{{default}}:{what}")
                for what in ("windows", "refs", "meta", "names", "epoch", "dying")
            }
            assert len(slots) == 1
            chunk_slots = {
                node.execute_command("CLUSTER KEYSLOT", f"cwm:chunk:{{default:{c.digest.hex()}}}")
                for c in chunks
            }
            assert len(chunk_slots) > 40
            two.clone("spread", "spread-2")
            assert thawed(two, "spread-2") == [c.data() for c in chunks]
            one.delete("spread")
            with pytest.raises(NotFound):
                two.get("spread")
            two.delete("spread-2")
            assert sum(redis_cluster.keys_per_node("cwm:chunk:*")) == 0
    finally:
        first.stop()
        second.stop()
    # The shared-and-delete walk-through works on the cluster as on one Redis.
    _share_and_delete(tmp_path / "again", redis_cluster.urls, chunk_tokens=256, tokens=700)
    audit = catalog_audit(
        RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", n.port) for n in redis_cluster.nodes])
    )
    assert audit["refs"] == {} and audit["chunk_keys"] == set() and audit["dying"] == {}


def _storm(first: RedisManager, second: RedisManager, audit_client: object) -> None:
    """Four threads clone, delete and re-freeze through both managers at once."""
    shared = [c.data() for c in synthetic_chunks(256 * 3, seed=1)]
    own = [c.data() for c in synthetic_chunks(256 * 2, seed=2)]
    bases = {
        "base-a": chunks_from_bytes(shared, 256, 256 * 3),
        "base-b": chunks_from_bytes(shared[:2] + own, 256, 256 * 4),
    }
    tokens = {name: 256 * len(chunks) for name, chunks in bases.items()}
    with WindowClient(first.target) as one:
        for name, chunks in bases.items():
            one.freeze(name, chunks, fingerprint=FINGERPRINT, token_ids=token_ids(tokens[name]))
    names = list(bases)
    lock = threading.Lock()
    failures: list[BaseException] = []
    allowed = (NotFound, AlreadyExists, FailedPrecondition)
    done: Counter[str] = Counter()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        targets = [first.target, second.target]
        with WindowClient(targets[seed % 2]) as a, WindowClient(targets[(seed + 1) % 2]) as b:
            for step in range(60):
                client = a if step % 2 else b
                with lock:
                    known = list(names)
                op = rng.random()
                try:
                    if known and op < 0.45:
                        new = f"c{seed}-{step}"
                        client.clone(rng.choice(known), new)
                        done["clone"] += 1
                        with lock:
                            names.append(new)
                    elif known and op < 0.8:
                        victim = rng.choice(known)
                        client.delete(victim)
                        done["delete"] += 1
                        with lock:
                            if victim in names:
                                names.remove(victim)
                    else:
                        base = rng.choice(list(bases))
                        client.freeze(
                            base,
                            bases[base],
                            fingerprint=FINGERPRINT,
                            token_ids=token_ids(tokens[base]),
                            replace=True,
                        )
                        done["freeze"] += 1
                        with lock:
                            if base not in names:
                                names.append(base)
                except allowed as exc:
                    done[type(exc).__name__] += 1
                except BaseException as exc:  # noqa: BLE001 - reported below
                    failures.append(exc)
                    return

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures
    print("storm:", dict(done))
    assert done["clone"] >= 10 and done["delete"] >= 10 and done["freeze"] >= 5, done

    audit = catalog_audit(audit_client)
    # Every chunk's refcount is the number of window references to it; no row without a
    # reference, no chunk bytes without a row, no claim left behind.
    assert audit["refs"] == audit["expected"]
    assert audit["meta"] == set(audit["refs"])
    assert audit["chunk_keys"] == set(audit["refs"])
    assert audit["info_keys"] == audit["chunk_keys"]
    assert audit["dying"] == {}
    # And every window left thaws, verified, through the other manager.
    with WindowClient(second.target) as two:
        listed = {w.name for w in two.list()}
        assert listed == audit["windows"]
        for name in sorted(listed)[:6]:
            info = two.get(name)
            assert len(thawed(two, name)) == info.chunk_count
    # Deleting what is left empties everything.
    with WindowClient(first.target) as one:
        for name in listed:
            one.delete(name)
    audit = catalog_audit(audit_client)
    assert audit["refs"] == {} and audit["chunk_keys"] == set() and audit["dying"] == {}


def test_storm_of_clones_and_deletes_through_two_managers(
    tmp_path: Path, redis_server: RedisServer
):
    first, second = _two_managers(tmp_path, redis_server.url)
    try:
        _storm(first, second, redis_server.client())
    finally:
        first.stop()
        second.stop()


def test_storm_on_the_cluster(tmp_path: Path, redis_cluster: RedisClusterProcs):
    first, second = _two_managers(tmp_path, redis_cluster.urls)
    audit_client = RedisCluster(
        startup_nodes=[ClusterNode("127.0.0.1", n.port) for n in redis_cluster.nodes]
    )
    try:
        _storm(first, second, audit_client)
    finally:
        first.stop()
        second.stop()
        audit_client.close()


def test_tier_only_keeps_a_local_catalog_and_copies_chunks(
    tmp_path: Path, redis_server: RedisServer
):
    """Without --redis-catalog the catalog stays in SQLite; chunks are written through to
    Redis as well as the disk, and a chunk whose file is gone is read back from Redis."""
    manager = RedisManager(redis_config(tmp_path / "m", redis_server.url, redis_catalog=False))
    chunks = synthetic_chunks(600, seed=5)
    try:
        with WindowClient(manager.target) as client:
            client.freeze("local", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(600))
            audit = catalog_audit(redis_server.client())
            assert audit["windows"] == set()  # no shared catalog
            assert audit["chunk_keys"] == {c.digest for c in chunks}
            for path in chunk_files(tmp_path / "m"):
                path.unlink()
            manager.manager.memory.remove("default", [chunks[0].digest])
            assert thawed(client, "local") == [c.data() for c in chunks]
            client.delete("local")
            assert catalog_audit(redis_server.client())["chunk_keys"] == set()
    finally:
        manager.stop()


def test_bad_redis_settings_are_refused(tmp_path: Path) -> None:
    from cwm_server.settings.loading import ConfigError, load

    with pytest.raises(ConfigError, match="redis://"):
        load(environ={"CWM_REDIS_URL": "http://127.0.0.1:1"})
    with pytest.raises(ValueError, match="need --redis-url"):
        RedisManager(redis_config(tmp_path / "m", "", redis_catalog=True))


def test_chunk_values_are_verified(tmp_path: Path, redis_server: RedisServer) -> None:
    """A chunk whose bytes in Redis are damaged is refused with DATA_LOSS, never served."""
    from cwm_client.errors import DataLoss

    first, second = _two_managers(tmp_path, redis_server.url)
    chunks = synthetic_chunks(300, seed=9)
    try:
        with WindowClient(first.target) as one, WindowClient(second.target) as two:
            one.freeze("w", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(300))
            raw = redis_server.client()
            key = f"cwm:chunk:{{default:{chunks[1].digest.hex()}}}"
            value = bytearray(raw.get(key))
            value[-1] ^= 0xFF
            raw.set(key, bytes(value))
            with pytest.raises(DataLoss, match="failed verification"):
                thawed(two, "w")
            assert thawed(one, "w") == [c.data() for c in chunks]
    finally:
        first.stop()
        second.stop()


def test_keyed_chunks_are_refused_in_fleet_mode(tmp_path: Path, redis_server: RedisServer) -> None:
    """The LMCache keyed chunks live in the SQLite catalog only (keyed.py): a fleet-mode
    manager says so with FAILED_PRECONDITION and a reason, never INTERNAL."""
    import grpc

    from cwm_client import pb

    manager = RedisManager(redis_config(tmp_path / "m", redis_server.url))
    try:
        with grpc.insecure_channel(manager.target) as channel:
            stub = pb.KeyedChunkServiceStub(channel)
            for call, request in (
                (stub.ListKeys, pb.ListKeysRequest()),
                (stub.ContainsPrefix, pb.ContainsPrefixRequest(keys=["a"])),
            ):
                with pytest.raises(grpc.RpcError) as caught:
                    call(request, timeout=10)
                assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "Redis" in (caught.value.details() or "")
    finally:
        manager.stop()


def test_a_delete_during_a_thaw_collects_after_the_stream(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A window deleted while one of its thaws streams: the stream still gets every chunk
    (its pins hold them), and the chunks leave Redis when the stream ends."""
    from tests.ops_helpers import wait_for

    manager = RedisManager(
        redis_config(tmp_path / "m", redis_server.url, redis_policy="redis-only")
    )
    chunks = synthetic_chunks(256 * 12, seed=11)
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
                lambda: catalog_audit(redis_server.client())["chunk_keys"] == set(),
                what="chunks collected after the stream",
            )
    finally:
        manager.stop()


def test_cwm_serve_flags_run_a_fleet(tmp_path: Path, redis_server: RedisServer) -> None:
    """The documented flags, through `cwm serve` subprocesses: two managers on one Redis,
    one stateless; `cwm status` lists the Redis component."""
    import json
    import subprocess
    import sys

    from tests.helpers import ROOT, ManagerProcess

    common = ["--redis-url", redis_server.url, "--redis-catalog", "--health-interval", "0.2"]
    first = ManagerProcess(tmp_path / "a", common).start()
    second = ManagerProcess(tmp_path / "b", [*common, "--redis-policy", "redis-only"]).start()
    chunks = synthetic_chunks(600, seed=12)
    try:
        with WindowClient(first.target) as one, WindowClient(second.target) as two:
            one.freeze("cli", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(600))
            assert thawed(two, "cli") == [c.data() for c in chunks]
        assert chunk_files(tmp_path / "b") == []
        command = [sys.executable, "-m", "cwm_server.cli.main", "status", "--json"]
        done = subprocess.run(
            [*command, "--manager", second.target],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        report = json.loads(done.stdout)
        redis_part = report["components"]["cwm.tier.redis"]
        assert redis_part["status"] == "SERVING"
        assert "shared catalog" in redis_part["detail"] and "redis-only" in redis_part["detail"]
    finally:
        first.stop()
        second.stop()


def test_tenants_are_apart_in_the_shared_catalog(redis_server: RedisServer) -> None:
    """Two tenants (one with braces and colons in its name) commit the same window name
    over the same chunk: each sees only its own, refcounts are per tenant, and no tenant
    name can move a key's hash tag."""
    from cwm_server.manager.catalog.base import NewChunk
    from cwm_server.manager.catalog.redis import RedisCatalog
    from cwm_server.manager.tiers.format import StoredChunk
    from cwm_server.manager.tiers.redis import RedisTier
    from cwm_server.manager.tiers.redis_link import RedisLink

    link = RedisLink([redis_server.url])
    catalog = RedisCatalog(link)
    tier = RedisTier(link)
    digest = bytes(range(32))
    try:
        for tenant in ("alice", "b{o}b:x"):
            window = pb.WindowInfo(name="same", tenant=tenant, chunk_count=1)
            window.chunks.add(index=0, digest=digest, raw_size=4, stored_size=4)
            tier.write(tenant, digest, StoredChunk(1, 1, 4, b"abcd"))
            assert catalog.commit_window(window, {digest: NewChunk(digest, 4, 4, 1)}, False) == []
        assert catalog.refcounts("alice") == {digest: 1}
        assert catalog.refcounts("b{o}b:x") == {digest: 1}
        assert catalog.delete_window("alice", "same") == [(digest, 4)]
        assert catalog.get_window("alice", "same") is None
        assert catalog.get_window("b{o}b:x", "same") is not None
        assert "{~" in catalog.keys("b{o}b:x")[0] and "{~" in tier.key("b{o}b:x", digest)
        assert catalog.all_tenants() == ["alice", "b{o}b:x"]
    finally:
        link.close()


def test_a_corrupt_disk_copy_is_served_from_redis_and_rewritten(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Before answering DATA_LOSS a read tries the other tiers: a verified Redis copy is
    served, and the local copy is repaired from it (nothing left in quarantine)."""
    manager = RedisManager(
        redis_config(tmp_path / "m", redis_server.url, redis_catalog=False, memory_cache_bytes=0)
    )
    chunks = synthetic_chunks(300, seed=19)
    try:
        with WindowClient(manager.target) as client:
            client.freeze("w", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(300))
            path = manager.manager.disk.path_for("default", chunks[0].digest)
            damaged = bytearray(path.read_bytes())
            damaged[len(damaged) // 2] ^= 0x10
            path.write_bytes(bytes(damaged))
            assert thawed(client, "w") == [c.data() for c in chunks]
            assert path.exists() and path.read_bytes() != bytes(damaged)  # rewritten
            assert manager.manager.store.check_disk_copy("default", chunks[0].digest)
            assert len(manager.manager.store.quarantine) == 0
            assert client.find_missing([c.digest for c in chunks]) == []
    finally:
        manager.stop()
