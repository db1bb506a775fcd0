"""Regressions from the review of quotas, keyed chunks (LMCache) and their interplay.

Real grpc.aio managers on ephemeral ports (`ThreadedManager`); raw generated stubs where the
SDK could hide a detail (deadlines, tiny part sizes, a stream that stops mid-value). Every
refusal is checked for its exact status code, and for what it left behind: chunk files,
catalog rows, keys, windows and quota reservations.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cwm_client import KeyedChunkClient, KeyedValue, WindowClient, pb
from cwm_client._common import CHANNEL_OPTIONS, build_header
from cwm_client.errors import ResourceExhausted, from_rpc_error
from cwm_client.keyed import put_requests
from cwm_server.manager.config import ManagerConfig
from cwm_server.manager.quotas import Quota, QuotaLedger, QuotaPolicy, Usage
from tests.helpers import (
    FINGERPRINT,
    ThreadedManager,
    chunk_files,
    eventually,
    synthetic_chunks,
    token_ids,
)

Code = grpc.StatusCode
CHUNK = 256 * 2048  # raw bytes of one 256-token chunk of FINGERPRINT (512 KiB)


def start(tmp_path: Path, quotas: str | None = None) -> ThreadedManager:
    quota_file = None
    if quotas is not None:
        quota_file = tmp_path / "quotas.toml"
        quota_file.write_text(quotas)
    return ThreadedManager(
        ManagerConfig(data_dir=tmp_path / "data", listen="127.0.0.1:0", quota_file=quota_file)
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


def key_rows(manager: ThreadedManager) -> list[str]:
    with KeyedChunkClient(manager.target) as keyed:
        return [info.key for info in keyed.list_keys()]


def no_reservations(manager: ThreadedManager) -> bool:
    quotas = manager.manager.quotas
    return quotas.open_reservations() == 0 and quotas.reserved("default") == (0, 0)


class Slowed:
    """Wraps a callable so each call sleeps first; `finished` is set once a call returned."""

    def __init__(self, target: Callable[..., Any], delay: float) -> None:
        self.target = target
        self.delay = delay
        self.finished = threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self.delay)
        try:
            return self.target(*args, **kwargs)
        finally:
            self.finished.set()


def chunk_value(key: str, seed: int) -> KeyedValue:
    """A value the size of one 256-token chunk of FINGERPRINT (promotable)."""
    return KeyedValue(key, synthetic_chunks(256, seed=seed)[0].raw, word_size=2)


# -- 1. a freeze cancelled while its reservation is being made ------------------------------


@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_cancelled_freeze_does_not_leak_its_reservation(
    tmp_path: Path, managers: list[ThreadedManager], how: str
) -> None:
    """The reservation is made on the catalog thread; a stream cancelled (or past its
    deadline) while that runs must still release it, or the tenant is refused until a
    restart (quota of one window here)."""
    manager = start(tmp_path, '[default]\nmax_bytes = "1MiB"\nmax_windows = 1\n')
    managers.append(manager)
    quotas = manager.manager.quotas
    slow = Slowed(quotas.reserve, 1.0)
    quotas.reserve = slow  # type: ignore[method-assign]
    chunks = synthetic_chunks(256, seed=9)
    header = build_header("leak", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(256, 9))
    gate = threading.Event()

    def requests() -> Iterator[pb.FreezeRequest]:
        yield pb.FreezeRequest(header=header)
        gate.wait(10)

    with grpc.insecure_channel(manager.target, options=CHANNEL_OPTIONS) as channel:
        stub = pb.WindowServiceStub(channel)
        try:
            if how == "deadline":
                with pytest.raises(grpc.RpcError) as caught:
                    stub.Freeze(requests(), timeout=0.3)
                assert caught.value.code() == Code.DEADLINE_EXCEEDED
            else:
                future = stub.Freeze.future(requests(), timeout=30)
                time.sleep(0.3)  # the manager is inside the slowed reserve now
                assert future.cancel()
        finally:
            gate.set()
    # The reserve on the catalog thread still completes, after the stream is gone ...
    assert slow.finished.wait(10)
    # ... and what it reserved is released, not held until a restart.
    assert eventually(lambda: no_reservations(manager)), quotas.reserved("default")
    quotas.reserve = slow.target  # type: ignore[method-assign]
    data = manager.config.data_dir
    assert chunk_files(data) == []
    assert usage(manager) == Usage()
    with WindowClient(manager.target) as client:
        assert list(client.list()) == []
        client.freeze(
            "ok",
            synthetic_chunks(256, seed=1),
            fingerprint=FINGERPRINT,
            token_ids=token_ids(256, 1),
        )
        assert [w.name for w in client.list()] == ["ok"]
    assert no_reservations(manager)


# -- 2. PromoteKeysToWindow and max_windows -------------------------------------------------


def test_promote_keys_respects_the_window_quota(
    tmp_path: Path, managers: list[ThreadedManager]
) -> None:
    manager = start(tmp_path, "[default]\nmax_windows = 2\n")
    managers.append(manager)
    ids = token_ids(256, 3)
    promote: dict[str, Any] = {"fingerprint": FINGERPRINT, "token_ids": ids, "chunk_tokens": 256}
    with KeyedChunkClient(manager.target) as keyed, WindowClient(manager.target) as client:
        keyed.put([chunk_value("k0", 3)])
        keyed.promote("w0", ["k0"], **promote)
        keyed.promote("w1", ["k0"], **promote)
        files = chunk_files(manager.config.data_dir)
        with pytest.raises(ResourceExhausted) as refused:
            keyed.promote("w2", ["k0"], **promote)
        assert refused.value.code == Code.RESOURCE_EXHAUSTED
        assert refused.value.reason == "QUOTA_EXCEEDED"
        assert refused.value.metadata["quota"] == "max_windows"
        assert refused.value.metadata["used"] == "2"
        assert sorted(w.name for w in client.list()) == ["w0", "w1"]
        assert chunk_files(manager.config.data_dir) == files
        assert usage(manager).windows == 2
        # Replacing a live window adds none: allowed at the limit.
        keyed.promote("w0", ["k0"], replace=True, **promote)
        # An expired window does not stand in the way: it is collected, then checked again.
        client.delete("w1")
        info = keyed.promote("short", ["k0"], ttl_seconds=1, **promote)
        expires = info.expires_at.seconds + info.expires_at.nanos / 1e9
        time.sleep(max(0.0, expires - time.time()) + 0.05)
        keyed.promote("w2", ["k0"], **promote)
        assert sorted(w.name for w in client.list()) == ["w0", "w2"]
        assert usage(manager).windows == 2
    assert no_reservations(manager)


# -- 3. keyed puts are checked against max_bytes --------------------------------------------


def test_keyed_put_over_the_byte_quota_stores_nothing(
    tmp_path: Path, managers: list[ThreadedManager]
) -> None:
    manager = start(tmp_path, f"[default]\nmax_bytes = {2 * CHUNK + 4096}\n")
    managers.append(manager)
    data = manager.config.data_dir
    first = [KeyedValue(f"a{i}", os.urandom(CHUNK), word_size=2) for i in range(2)]
    with KeyedChunkClient(manager.target) as keyed:
        keyed.put(first)
        assert usage(manager).raw_bytes == 2 * CHUNK
        files = chunk_files(data)
        # A stream whose second value does not fit: the first fits (and is reserved and
        # stored), the second is refused, and the put is all or nothing: neither is kept.
        extra = [KeyedValue("b0", b"x" * 1000), KeyedValue("b1", os.urandom(CHUNK), word_size=2)]
        with pytest.raises(ResourceExhausted) as refused:
            keyed.put(extra)
        assert refused.value.code == Code.RESOURCE_EXHAUSTED
        assert refused.value.reason == "QUOTA_EXCEEDED"
        assert refused.value.metadata["quota"] == "max_bytes"
        assert refused.value.metadata["used"] == str(2 * CHUNK)
        assert refused.value.metadata["reserved"] == "1000"  # b0, in flight
        assert refused.value.metadata["requested"] == str(CHUNK)
        assert chunk_files(data) == files
        assert sorted(key_rows(manager)) == ["a0", "a1"]
        assert usage(manager).raw_bytes == 2 * CHUNK
        assert no_reservations(manager)
        # Values the tenant already holds add nothing: new keys for the same bytes fit.
        keyed.put([KeyedValue("same", first[0].data, word_size=2)])
        assert usage(manager).raw_bytes == 2 * CHUNK
        # Keyed bytes count for freezes too.
        with WindowClient(manager.target) as client, pytest.raises(ResourceExhausted):
            client.freeze(
                "f",
                synthetic_chunks(256, seed=5),
                fingerprint=FINGERPRINT,
                token_ids=token_ids(256, 5),
            )
        # Deleting keys frees the quota.
        keyed.delete(["a1"])
        keyed.put([KeyedValue("c", os.urandom(CHUNK), word_size=2)])
        assert sorted(key_rows(manager)) == ["a0", "c", "same"]
    assert no_reservations(manager)


def test_keyed_put_is_refused_at_the_first_part_of_a_value(
    tmp_path: Path, managers: list[ThreadedManager]
) -> None:
    """Header time: the manager refuses a value that does not fit when its first part
    arrives, without waiting for (or storing) the rest of it; and it checks against the
    same ledger as freezes, so a freeze in flight holds its share."""
    manager = start(tmp_path, f"[default]\nmax_bytes = {3 * CHUNK}\n")
    managers.append(manager)
    data = manager.config.data_dir
    chunks = synthetic_chunks(512, seed=7)  # two chunks, reserved by the held freeze
    header = build_header("held", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(512, 7))
    freeze_gate, put_gate = threading.Event(), threading.Event()

    def freeze_requests() -> Iterator[pb.FreezeRequest]:
        yield pb.FreezeRequest(header=header)
        freeze_gate.wait(30)

    big = KeyedValue("big", os.urandom(2 * CHUNK), word_size=2)
    parts = list(put_requests([big], part_bytes=64 << 10))
    assert len(parts) == 16

    def put_parts() -> Iterator[pb.PutKeyedChunksRequest]:
        yield parts[0]
        put_gate.wait(30)  # the rest never comes while the manager answers
        yield from parts[1:]

    with grpc.insecure_channel(manager.target, options=CHANNEL_OPTIONS) as channel:
        held = pb.WindowServiceStub(channel).Freeze.future(freeze_requests(), timeout=60)
        try:
            assert eventually(lambda: manager.manager.quotas.reserved("default") == (2 * CHUNK, 1))
            call = pb.KeyedChunkServiceStub(channel).PutKeyedChunks.future(put_parts(), timeout=60)
            with pytest.raises(grpc.RpcError) as caught:
                call.result(timeout=10)
            assert caught.value.code() == Code.RESOURCE_EXHAUSTED
            error = from_rpc_error(caught.value)
            assert isinstance(error, ResourceExhausted) and error.reason == "QUOTA_EXCEEDED"
            assert error.metadata["reserved"] == str(2 * CHUNK)  # the freeze's share
            assert not put_gate.is_set()  # refused before the value's remaining parts
            assert chunk_files(data) == []
        finally:
            put_gate.set()
            held.cancel()
            freeze_gate.set()
    assert eventually(lambda: no_reservations(manager))
    assert key_rows(manager) == []
    assert usage(manager) == Usage()
    # Without the freeze in flight, the same value fits.
    with KeyedChunkClient(manager.target) as keyed:
        keyed.put([big])
    assert usage(manager).raw_bytes == 2 * CHUNK
    assert no_reservations(manager)


# -- 4. a cancelled keyed put leaves no orphan file -----------------------------------------


def test_cancelled_keyed_put_leaves_no_orphan_chunk(
    tmp_path: Path, managers: list[ThreadedManager]
) -> None:
    """The put was cancelled while its value was being stored on an I/O thread: the clean-up
    waits for that store before collecting, so no file is left without a row."""
    manager = start(tmp_path)
    managers.append(manager)
    store = manager.manager.store
    slow = Slowed(store.put, 1.0)
    store.put = slow  # type: ignore[method-assign]
    gate = threading.Event()

    def requests() -> Iterator[pb.PutKeyedChunksRequest]:
        yield from put_requests([KeyedValue("x", os.urandom(4096))])
        gate.wait(10)

    with grpc.insecure_channel(manager.target, options=CHANNEL_OPTIONS) as channel:
        stub = pb.KeyedChunkServiceStub(channel)
        try:
            with pytest.raises(grpc.RpcError) as caught:
                stub.PutKeyedChunks(requests(), timeout=0.4)
            assert caught.value.code() == Code.DEADLINE_EXCEEDED
        finally:
            gate.set()
    assert slow.finished.wait(10)  # the store landed its file after the cancel ...
    data = manager.config.data_dir
    # ... and was collected
    assert eventually(lambda: chunk_files(data) == [], timeout=5), chunk_files(data)
    time.sleep(0.2)
    assert chunk_files(data) == []
    store.put = slow.target  # type: ignore[method-assign]
    assert key_rows(manager) == []
    assert usage(manager) == Usage()


# -- 5. check_windows reads the catalog outside the ledger lock -----------------------------


def test_check_windows_reads_usage_outside_the_ledger_lock() -> None:
    ledger = QuotaLedger(QuotaPolicy(default=Quota(max_windows=2, max_bytes=10)))
    seen: list[bool] = []

    def usage_now() -> Usage:
        seen.append(ledger._lock.locked())
        return Usage(windows=1)

    ledger.check_windows("t", usage_now)
    with pytest.raises(ResourceExhausted):
        ledger.check_windows("t", usage_now, adding=2)
    held = ledger.reserve("t", "k", usage=usage_now, new_chunks=dict, new_windows=1)
    held.release()
    assert seen == [False, False, False]


# -- 9. GetKeyedChunks clamps max_part_bytes from below -------------------------------------


def test_get_keyed_chunks_clamps_a_tiny_part_size(
    tmp_path: Path, managers: list[ThreadedManager]
) -> None:
    manager = start(tmp_path)
    managers.append(manager)
    data = os.urandom(70 << 10)
    with KeyedChunkClient(manager.target) as keyed:
        keyed.put([KeyedValue("v", data)])
    with grpc.insecure_channel(manager.target, options=CHANNEL_OPTIONS) as channel:
        stub = pb.KeyedChunkServiceStub(channel)
        responses = list(
            stub.GetKeyedChunks(pb.GetKeyedChunksRequest(keys=["v"], max_part_bytes=1), timeout=30)
        )
    sizes = [len(r.part.data) for r in responses]
    assert sizes == [64 << 10, (70 << 10) - (64 << 10)]
    assert b"".join(r.part.data for r in responses) == data
