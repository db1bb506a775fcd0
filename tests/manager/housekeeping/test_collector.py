"""Chunks freed while a stream pins them are collected when the last pin goes, with the
SQLite catalog too (not only the shared one), and `collect_expired(tenant)` finds that
tenant's expired windows whatever other tenants hold."""

from __future__ import annotations

import time
from pathlib import Path

from cwm_client import WindowClient, pb
from cwm_server.manager.config import ManagerConfig
from tests.helpers import FINGERPRINT, ThreadedManager, chunk_files, synthetic_chunks, token_ids
from tests.ops_helpers import wait_for


def test_delete_during_a_thaw_collects_the_files_after_the_stream(tmp_path: Path) -> None:
    """A slow reader thaws a window while it is deleted: the stream still gets every
    chunk (its pins keep the files), and when it ends the files are gone (before, they
    stayed until the manager restarted)."""
    manager = ThreadedManager(ManagerConfig(data_dir=tmp_path / "m", listen="127.0.0.1:0"))
    chunks = synthetic_chunks(256 * 12, seed=51)
    try:
        with WindowClient(manager.target) as client:
            client.freeze("w", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(256 * 12))
            assert len(chunk_files(tmp_path / "m")) == len(chunks)
            with client.thaw("w", streams=1) as stream:
                received = iter(stream)
                first = bytes(next(received).data)
                client.delete("w")
                assert len(chunk_files(tmp_path / "m")) == len(chunks)  # pinned: kept
                rest = [bytes(c.data) for c in received]
            assert [first, *rest] == [c.data() for c in chunks]
            wait_for(lambda: chunk_files(tmp_path / "m") == [], what="files collected")
            assert not manager.manager.pins.deferred()
    finally:
        manager.stop()


def test_a_chunk_taken_again_while_pinned_survives_its_deferred_collection(
    tmp_path: Path,
) -> None:
    """Deleted while a thaw pins it, then frozen again before the thaw ends: the deferred
    collection finds a row and keeps the file."""
    manager = ThreadedManager(ManagerConfig(data_dir=tmp_path / "m", listen="127.0.0.1:0"))
    chunks = synthetic_chunks(256 * 8, seed=52)
    try:
        with WindowClient(manager.target) as client:
            client.freeze("w", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(256 * 8))
            with client.thaw("w", streams=1) as stream:
                received = iter(stream)
                next(received)
                client.delete("w")
                client.freeze("v", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(256 * 8))
                list(received)
            time.sleep(0.3)
            assert len(chunk_files(tmp_path / "m")) == len(chunks)
            with client.thaw("v", streams=1) as stream:
                assert [bytes(c.data) for c in stream] == [c.data() for c in chunks]
    finally:
        manager.stop()


def _expired_window(tenant: str, name: str, expired_at: float) -> pb.WindowInfo:
    window = pb.WindowInfo(tenant=tenant, name=name)
    window.expires_at.seconds = int(expired_at)
    return window


def test_collect_expired_of_one_tenant_ignores_the_others(tmp_path: Path) -> None:
    """Other tenants' windows that expired earlier (more than the batch) do not hide this
    tenant's: `collect_expired("alice")` deletes alice's and touches nobody else's."""
    manager = ThreadedManager(
        ManagerConfig(data_dir=tmp_path / "m", listen="127.0.0.1:0", ttl_interval_s=3600)
    )
    wm = manager.manager
    now = time.time()
    try:

        def _fill() -> None:
            for i in range(5):
                wm.catalog.commit_window(_expired_window("bob", f"b{i}", now - 200 - i), {}, False)
            wm.catalog.commit_window(_expired_window("alice", "a", now - 100), {}, False)

        manager._run(wm.db(_fill))
        assert manager._run(wm.db(wm.catalog.expired_windows, now, 3, "alice")) == [("alice", "a")]
        assert manager._run(wm.collect_expired("alice", 3)) == 1
        assert not manager._run(wm.db(wm.catalog.window_exists, "alice", "a", True))
        left = manager._run(wm.db(wm.catalog.expired_windows, time.time(), 100))
        assert sorted(left) == [("bob", f"b{i}") for i in range(5)]
        # The all-tenants sweep still works.
        assert manager._run(wm.collect_expired(None, 3)) == 3
        assert manager._run(wm.collect_expired(None, 3)) == 2
        assert manager._run(wm.db(wm.catalog.expired_windows, time.time(), 100)) == []
    finally:
        manager.stop()
