"""Quotas and TTLs against a real manager (grpc.aio on 127.0.0.1, a fresh data dir each).

Quotas: a freeze over the byte or window quota is refused with RESOURCE_EXHAUSTED /
QUOTA_EXCEEDED before a byte is stored (no chunk file, no catalog row); freezes in flight
reserve their share, so concurrent ones cannot jointly overshoot. TTLs: an expired window is
invisible at once; the collector deletes it through the delete path and frees the chunks only
it used, while a clone with a longer TTL and a pinned window survive.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest

from cwm_client import InMemoryChunk, WindowClient, chunks_from_bytes, pb
from cwm_client._common import CHANNEL_OPTIONS, build_header, freeze_requests
from cwm_client.chunks import ChunkPayload
from cwm_client.errors import NotFound, ResourceExhausted
from cwm_client.ttl import TTL_CLASSES, Ttl, parse_ttl
from cwm_server.cli.main import build_parser
from cwm_server.manager.config import ManagerConfig, ServerOptions
from cwm_server.manager.quotas import Quota, QuotaFileError, QuotaPolicy, Usage, parse_size
from cwm_server.manager.rpc import auth
from tests.helpers import (
    FINGERPRINT,
    ROOT,
    ManagerProcess,
    ThreadedManager,
    chunk_files,
    env_with_pythonpath,
    eventually,
    synthetic_chunks,
    token_ids,
)

CWM = [sys.executable, "-m", "cwm_server.cli.main"]
CHUNK = 256 * 2048  # raw bytes of one 256-token chunk of FINGERPRINT (512 KiB)


def start_manager(
    tmp_path: Path, quotas: str | None = None, ttl_interval_s: float = 3600.0
) -> ThreadedManager:
    quota_file = None
    if quotas is not None:
        quota_file = tmp_path / "quotas.toml"
        quota_file.write_text(quotas)
    return ThreadedManager(
        ManagerConfig(
            data_dir=tmp_path / "data",
            listen="127.0.0.1:0",
            quota_file=quota_file,
            ttl_interval_s=ttl_interval_s,
        )
    )


@pytest.fixture
def managers() -> Iterator[list[ThreadedManager]]:
    started: list[ThreadedManager] = []
    yield started
    for running in started:
        running.stop()


def usage(manager: ThreadedManager, tenant: str = "default") -> Usage:
    wm = manager.manager
    result: Usage = manager._run(wm.db(wm.catalog.tenant_usage, tenant))
    return result


def window(seed: int, chunks: int) -> tuple[list[InMemoryChunk], list[int]]:
    tokens = 256 * chunks
    return list(synthetic_chunks(tokens, seed=seed)), token_ids(tokens, seed=seed)


def freeze(
    client: WindowClient,
    name: str,
    chunks: Sequence[ChunkPayload],
    ids: Sequence[int],
    **kwargs: object,
) -> pb.WindowInfo:
    return client.freeze(name, chunks, fingerprint=FINGERPRINT, token_ids=ids, **kwargs).window  # type: ignore[arg-type]


def thaw_digests(client: WindowClient, name: str) -> list[bytes]:
    with client.thaw(name) as stream:
        return [chunk.digest for chunk in stream]


class HeldFreeze:
    """A Freeze stream that sends its header, then waits for `release()` before sending its
    chunks and closing: its quota reservation is held meanwhile."""

    def __init__(self, target: str, name: str, chunks: Sequence[ChunkPayload], ids: Sequence[int]):
        header = build_header(name, chunks, fingerprint=FINGERPRINT, token_ids=ids)
        self._requests = list(freeze_requests(header, chunks))
        self._go = threading.Event()
        self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.future = pb.WindowServiceStub(self._channel).Freeze.future(self._iterate())

    def _iterate(self) -> Iterator[pb.FreezeRequest]:
        yield self._requests[0]
        self._go.wait(60)
        yield from self._requests[1:]

    def release(self) -> None:
        self._go.set()

    def close(self) -> None:
        self._go.set()
        self._channel.close()


# -- quota file and TTL classes ---------------------------------------------------------


def test_quota_file_parsing(tmp_path: Path) -> None:
    path = tmp_path / "q.toml"
    path.write_text(
        '[default]\nmax_bytes = "1GiB"\nmax_windows = 10\n'
        '[tenants.alice]\nmax_bytes = 1000\n[tenants."bob.x"]\nmax_windows = 3\n'
    )
    policy = QuotaPolicy.load(path)
    assert policy.for_tenant("zed").max_bytes == 1 << 30
    assert policy.for_tenant("zed").max_windows == 10
    assert policy.for_tenant("alice").max_bytes == 1000
    assert policy.for_tenant("alice").max_windows == 0  # its own table: unset is unlimited
    assert policy.for_tenant("bob.x").max_windows == 3
    assert parse_size("512 MiB") == 512 << 20 and parse_size("2GB") == 2_000_000_000
    for bad in ('[tenants.a]\nmax_bytes = "lots"\n', "[quota]\n", "[default]\nmax_windows = -1\n"):
        path.write_text(bad)
        with pytest.raises(QuotaFileError):
            QuotaPolicy.load(path)


def test_documented_quota_file_loads() -> None:
    """The example in docs/SECURITY.md is a working quota file."""
    text = (ROOT / "docs" / "SECURITY.md").read_text()
    section = text[text.index("## Quotas and TTLs") :]
    example = section[section.index("```toml\n") + 8 : section.index("```\n", 10)]
    policy = QuotaPolicy.from_mapping(tomllib.loads(example))
    assert policy.for_tenant("acme") == Quota(max_bytes=1 << 30, max_windows=100)
    assert policy.for_tenant("anyone") == Quota(max_bytes=50 << 30, max_windows=10000)


def test_ttl_classes_and_cli() -> None:
    assert parse_ttl("5m") == Ttl(300) and parse_ttl("1h") == Ttl(3600)
    assert parse_ttl("24h").seconds == 86400 == TTL_CLASSES["24h"]
    assert parse_ttl("pinned") == Ttl(0, pinned=True) and parse_ttl("never") == Ttl(0)
    assert parse_ttl("90s").seconds == 90 and parse_ttl("3d").seconds == 3 * 86400
    assert parse_ttl("120").seconds == 120 and parse_ttl(7).seconds == 7
    with pytest.raises(ValueError, match="class"):
        parse_ttl("soon")
    parser = build_parser()
    assert parser.parse_args(["clone", "a", "b", "--ttl", "1h"]).ttl == 3600
    assert parser.parse_args(["clone", "a", "b", "--ttl", "pinned"]).ttl == 0
    assert parser.parse_args(["freeze", "s", "w", "--ttl", "24h"]).ttl == 86400
    with pytest.raises(SystemExit):
        parser.parse_args(["clone", "a", "b", "--ttl", "tomorrow"])


# -- quotas -------------------------------------------------------------------------------


def test_freeze_over_byte_quota_stores_nothing(
    tmp_path: Path, managers: list[ThreadedManager]
) -> None:
    manager = start_manager(tmp_path, f"[tenants.default]\nmax_bytes = {3 * CHUNK}\n")
    managers.append(manager)
    data = manager.config.data_dir
    first, first_ids = window(1, 2)
    with WindowClient(manager.target) as client:
        freeze(client, "first", first, first_ids)
        files_before = chunk_files(data)
        assert len(files_before) == 2
        now = usage(manager)
        assert (now.windows, now.chunks, now.raw_bytes) == (1, 2, 2 * CHUNK)

        big, big_ids = window(2, 2)  # two new chunks: 4 > 3
        with pytest.raises(ResourceExhausted) as refused:
            freeze(client, "big", big, big_ids)
        assert refused.value.reason == "QUOTA_EXCEEDED"
        assert refused.value.metadata["quota"] == "max_bytes"
        assert refused.value.metadata["limit"] == str(3 * CHUNK)
        assert "quota" in refused.value.message
        # Nothing of it was stored: no file (not even a temp file), no row, no window.
        assert chunk_files(data) == files_before
        assert usage(manager).chunks == 2 and usage(manager).windows == 1
        assert len(client.find_missing([c.digest for c in big])) == 2
        assert [w.name for w in client.list()] == ["first"]
        assert manager.manager.quotas.reserved("default") == (0, 0)

        # Chunks the tenant already holds are free: two old + one new fit exactly.
        grown_chunks = chunks_from_bytes([first[0].raw, first[1].raw, big[0].raw], 256, 768)
        freeze(client, "grown", grown_chunks, token_ids(256 * 3, seed=9))
        assert usage(manager).raw_bytes == 3 * CHUNK
        # ... and a clone adds no bytes.
        client.clone("grown", "grown-2")
        assert usage(manager).raw_bytes == 3 * CHUNK

        # A freeze without the client's FindMissingChunks pre-check is refused the same way.
        one, one_ids = window(3, 1)
        with pytest.raises(ResourceExhausted):
            freeze(client, "one", one, one_ids, skip_existing=False)
        # Deleting frees the quota again (once no window uses the chunk).
        client.delete("grown")
        client.delete("grown-2")
        assert usage(manager).raw_bytes == 2 * CHUNK
        freeze(client, "one", one, one_ids)
        assert thaw_digests(client, "one") == [c.digest for c in one]


def test_window_count_quota_covers_freeze_and_clone(
    tmp_path: Path, managers: list[ThreadedManager]
) -> None:
    manager = start_manager(tmp_path, "[default]\nmax_windows = 2\n")
    managers.append(manager)
    data = manager.config.data_dir
    a, a_ids = window(10, 1)
    with WindowClient(manager.target) as client:
        freeze(client, "a", a, a_ids)
        client.clone("a", "b")
        c, c_ids = window(11, 1)
        files = chunk_files(data)
        with pytest.raises(ResourceExhausted) as refused:
            freeze(client, "c", c, c_ids)
        assert refused.value.reason == "QUOTA_EXCEEDED"
        assert refused.value.metadata["quota"] == "max_windows"
        assert chunk_files(data) == files
        with pytest.raises(ResourceExhausted) as clone_refused:
            client.clone("a", "d")
        assert clone_refused.value.reason == "QUOTA_EXCEEDED"
        assert sorted(w.name for w in client.list()) == ["a", "b"]
        # Replacing a window adds none: allowed at the limit.
        freeze(client, "a", c, c_ids, replace=True)
        assert thaw_digests(client, "a") == [x.digest for x in c]
        client.delete("b")
        client.clone("a", "d")
        assert sorted(w.name for w in client.list()) == ["a", "d"]


def test_concurrent_freezes_cannot_jointly_exceed(
    tmp_path: Path, managers: list[ThreadedManager]
) -> None:
    manager = start_manager(tmp_path, f"[tenants.default]\nmax_bytes = {3 * CHUNK}\n")
    managers.append(manager)
    data = manager.config.data_dir
    first, first_ids = window(20, 2)
    second, second_ids = window(21, 2)
    held = HeldFreeze(manager.target, "first", first, first_ids)
    try:
        # The first freeze's header reserved its two chunks; it has sent no chunk yet.
        assert eventually(lambda: manager.manager.quotas.reserved("default") == (2 * CHUNK, 1))
        with WindowClient(manager.target) as client:
            with pytest.raises(ResourceExhausted) as refused:
                freeze(client, "second", second, second_ids)
            assert refused.value.metadata["reserved"] == str(2 * CHUNK)
            assert chunk_files(data) == []
            held.release()
            response = held.future.result(timeout=30)
            assert response.window.name == "first"
            assert manager.manager.quotas.reserved("default") == (0, 0)
            assert [w.name for w in client.list()] == ["first"]
    finally:
        held.close()

    # A freeze that fails releases its reservation: cancel one mid-stream, then the other
    # fits.
    with WindowClient(manager.target) as client:
        client.delete("first")
    held = HeldFreeze(manager.target, "again", first, first_ids)
    try:
        assert eventually(lambda: manager.manager.quotas.reserved("default")[0] == 2 * CHUNK)
        held.future.cancel()
        assert eventually(lambda: manager.manager.quotas.reserved("default") == (0, 0))
    finally:
        held.close()
    with WindowClient(manager.target) as client:
        freeze(client, "second", second, second_ids)
        assert usage(manager).raw_bytes == 2 * CHUNK


def test_many_racing_freezes_stay_within_quota(
    tmp_path: Path, managers: list[ThreadedManager]
) -> None:
    """Eight clients at once, two new chunks each, against room for five: exactly two win."""
    manager = start_manager(tmp_path, f"[tenants.default]\nmax_bytes = {5 * CHUNK}\n")
    managers.append(manager)
    outcomes: dict[int, str] = {}
    barrier = threading.Barrier(8)

    def one(i: int) -> None:
        chunks, ids = window(100 + i, 2)
        with WindowClient(manager.target) as client:
            barrier.wait(30)
            try:
                freeze(client, f"w{i}", chunks, ids)
                outcomes[i] = "ok"
            except ResourceExhausted as exc:
                outcomes[i] = exc.reason

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes.values()) == ["QUOTA_EXCEEDED"] * 6 + ["ok"] * 2, outcomes
    assert usage(manager).raw_bytes == 4 * CHUNK <= 5 * CHUNK
    assert len(chunk_files(manager.config.data_dir)) == 4
    assert manager.manager.quotas.reserved("default") == (0, 0)


def test_quotas_are_per_tenant(tmp_path: Path, managers: list[ThreadedManager]) -> None:
    """Tenants from bearer tokens: `acme` has a table of its own, `other` the [default]."""
    tokens = {"acme": auth.mint_token(), "other": auth.mint_token()}
    auth_file = tmp_path / "auth.toml"
    auth_file.write_text("".join(auth.token_line(t, n, "writer") for n, t in tokens.items()))
    quota_file = tmp_path / "quotas.toml"
    quota_file.write_text(f"[default]\nmax_windows = 1\n[tenants.acme]\nmax_bytes = {2 * CHUNK}\n")
    manager = ThreadedManager(
        ManagerConfig(data_dir=tmp_path / "data", listen="127.0.0.1:0", quota_file=quota_file),
        ServerOptions(auth_file=auth_file),
    )
    managers.append(manager)
    two, two_ids = window(70, 2)
    more, more_ids = window(71, 1)
    with (
        WindowClient(manager.target, token=tokens["acme"]) as acme,
        WindowClient(manager.target, token=tokens["other"]) as other,
    ):
        freeze(acme, "a", two, two_ids)
        acme.clone("a", "b")  # acme has no window limit
        with pytest.raises(ResourceExhausted) as refused:
            freeze(acme, "c", more, more_ids)
        assert refused.value.metadata["tenant"] == "acme"
        # The same chunks are new to `other` (dedup is per tenant), and its quota differs.
        freeze(other, "a", two, two_ids)
        with pytest.raises(ResourceExhausted) as other_refused:
            other.clone("a", "b")
        assert other_refused.value.metadata["quota"] == "max_windows"
        assert usage(manager, "acme").raw_bytes == 2 * CHUNK
        assert usage(manager, "other").windows == 1


# -- TTLs ---------------------------------------------------------------------------------


def wait_until_expired(info: pb.WindowInfo) -> None:
    expires = info.expires_at.seconds + info.expires_at.nanos / 1e9
    time.sleep(max(0.0, expires - time.time()) + 0.05)


def test_expired_window_is_invisible_and_collected(
    tmp_path: Path, managers: list[ThreadedManager]
) -> None:
    manager = start_manager(tmp_path)  # collector interval 1 h: only the test sweeps
    managers.append(manager)
    data = manager.config.data_dir
    shared, shared_ids = window(30, 2)
    unique, unique_ids = window(31, 2)
    kept, kept_ids = window(32, 1)
    with WindowClient(manager.target) as client:
        base = freeze(client, "base", shared, shared_ids, ttl_seconds=3)
        short = freeze(client, "short", unique, unique_ids, ttl_seconds=3)
        long = client.clone("base", "long", ttl_seconds=3600)
        freeze(client, "pinned", kept, kept_ids, ttl_seconds=2, pinned=True)
        forever = client.clone("base", "forever")  # ttl 0: no expiry
        assert long.HasField("expires_at") and not forever.HasField("expires_at")
        assert sorted(w.name for w in client.list()) == [
            "base",
            "forever",
            "long",
            "pinned",
            "short",
        ]
        assert len(chunk_files(data)) == 5

        wait_until_expired(base)
        wait_until_expired(short)
        # Expired: invisible everywhere at once, before any collection.
        assert sorted(w.name for w in client.list()) == ["forever", "long", "pinned"]
        for name in ("base", "short"):
            with pytest.raises(NotFound):
                client.get(name)
            with pytest.raises(NotFound):
                thaw_digests(client, name)
            with pytest.raises(NotFound):
                client.clone(name, f"{name}-copy")
            with pytest.raises(NotFound):
                client.delete(name)
        assert len(chunk_files(data)) == 5  # not collected yet
        assert usage(manager).windows == 5

        swept = manager._run(manager.server.ttl_collector.sweep())
        assert swept == 2
        assert usage(manager).windows == 3
        # The chunks only `short` used are gone (file and row); `base`'s live on in the clones.
        assert len(chunk_files(data)) == 3
        assert len(client.find_missing([c.digest for c in unique])) == 2
        assert client.find_missing([c.digest for c in shared]) == []
        assert thaw_digests(client, "long") == [c.digest for c in shared]
        assert thaw_digests(client, "forever") == [c.digest for c in shared]
        assert thaw_digests(client, "pinned") == [c.digest for c in kept]
        assert client.get("pinned").pinned
        assert manager._run(manager.server.ttl_collector.sweep()) == 0

        # The name of an expired window is free again, even before the collector runs.
        again = freeze(client, "again", unique[:1], unique_ids[:256], ttl_seconds=1)
        wait_until_expired(again)
        freeze(client, "again", unique, unique_ids)
        assert thaw_digests(client, "again") == [c.digest for c in unique]
        client.clone("again", "again-branch", ttl_seconds=1)
        wait_until_expired(client.get("again-branch"))
        client.clone("again", "again-branch")
        assert not client.get("again-branch").HasField("expires_at")


def test_collector_runs_in_the_background(tmp_path: Path, managers: list[ThreadedManager]) -> None:
    manager = start_manager(tmp_path, ttl_interval_s=0.2)
    managers.append(manager)
    data = manager.config.data_dir
    chunks, ids = window(40, 2)
    with WindowClient(manager.target) as client:
        freeze(client, "brief", chunks, ids, ttl_seconds=1)
        assert len(chunk_files(data)) == 2
        assert eventually(lambda: not chunk_files(data), timeout=15)
        assert usage(manager) == Usage()
        assert manager.server.ttl_collector.expired_total == 1
        assert list(client.list()) == []


def test_expired_windows_do_not_block_a_quota(
    tmp_path: Path, managers: list[ThreadedManager]
) -> None:
    """Expired windows still hold their rows until collected; a quota check collects the
    tenant's expired windows before it refuses."""
    manager = start_manager(
        tmp_path, f"[tenants.default]\nmax_windows = 1\nmax_bytes = {2 * CHUNK}\n"
    )
    managers.append(manager)
    old, old_ids = window(50, 2)
    new, new_ids = window(51, 2)
    with WindowClient(manager.target) as client:
        info = freeze(client, "old", old, old_ids, ttl_seconds=1)
        wait_until_expired(info)
        freeze(client, "new", new, new_ids)
        assert [w.name for w in client.list()] == ["new"]
        assert usage(manager).raw_bytes == 2 * CHUNK
        assert len(chunk_files(manager.config.data_dir)) == 2


# -- `cwm serve` with the flags, and fsck after the collector ------------------------------


def test_serve_collects_then_fsck_finds_and_repairs(tmp_path: Path) -> None:
    """A real `cwm serve --ttl-interval --quota-file`: the collector deletes an expired
    window's chunks by itself; then, with the manager stopped, fsck finds what a crash or a
    disk fault could leave beside that (an orphan file of a collected chunk, a row nothing
    references, a corrupt chunk of a live window) and --repair fixes what it can."""

    def fsck(*extra: str) -> tuple[int, dict[str, object]]:
        out = subprocess.run(
            [*CWM, "fsck", "--data-dir", str(data), "--json", "--no-progress", *extra],
            cwd=ROOT,
            env=env_with_pythonpath(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode in (0, 1), out.stderr
        return out.returncode, json.loads(out.stdout)

    def kinds(report: dict[str, object]) -> list[str]:
        problems = report["problems"]
        assert isinstance(problems, list)
        return sorted(p["kind"] for p in problems)

    data = tmp_path / "data"
    quota_file = tmp_path / "quotas.toml"
    quota_file.write_text('[default]\nmax_bytes = "64MiB"\nmax_windows = 100\n')
    proc = ManagerProcess(
        data,
        ["--log-level", "WARNING", "--ttl-interval", "0.3", "--quota-file", str(quota_file)],
    )
    proc.start()
    short, short_ids = window(60, 2)
    keep, keep_ids = window(61, 2)
    try:
        with WindowClient(proc.target) as client:
            freeze(client, "short", short, short_ids, ttl_seconds=1)
            freeze(client, "keep", keep, keep_ids)
            saved = {p: p.read_bytes() for p in chunk_files(data)}
            assert len(saved) == 4
            assert eventually(lambda: len(chunk_files(data)) == 2, timeout=20)
            assert [w.name for w in client.list()] == ["keep"]
    finally:
        proc.kill(signal.SIGTERM)
    assert proc.proc is not None and proc.proc.returncode == 0

    rc, report = fsck()
    assert rc == 0 and report["clean"], report

    # An orphan: a collected chunk's file is back (as if the unlink was lost in a crash).
    collected = [p for p in saved if not p.exists()]
    assert len(collected) == 2
    collected[0].write_bytes(saved[collected[0]])
    # A row nothing references (the other collected chunk's), and a corrupt live chunk.
    gone_digest = bytes.fromhex(collected[1].name)
    with sqlite3.connect(data / "catalog.sqlite") as db:
        db.execute(
            "INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?)",
            ("default", gone_digest, 1, CHUNK, CHUNK, 1),
        )
    db.close()
    live = keep[1].digest
    live_path = data / "chunks" / "default" / live.hex()[:2] / live.hex()
    blob = bytearray(live_path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    live_path.write_bytes(bytes(blob))

    rc, report = fsck()
    assert rc == 1
    assert kinds(report) == ["corrupt", "orphan_file", "unreferenced_row"]
    rc, repaired = fsck("--repair")
    assert rc == 1 and repaired["repaired_count"] == 2
    assert not collected[0].exists()
    assert repaired["unrecoverable_windows"] == [{"window": "default/keep", "chunks": [1]}]
    rc, after = fsck()
    assert kinds(after) == ["corrupt"]  # a corrupt chunk is reported, never deleted
    assert "quarantined" in str(after)  # moved aside: an import of its bytes repairs it
