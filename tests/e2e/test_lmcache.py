"""LMCache's own engine on CPU with cwm as its remote storage plugin.

LMCache 0.5.6's LMCacheEngine runs here with its MockGPUConnector (the one its standalone
mode uses), given a KV buffer: from_gpu copies the buffer's tokens into the memory objects
LMCache allocates and to_gpu copies them back into another buffer, so the test can compare
the bytes LMCache stores with the bytes it hands back. Everything between the two buffers is
LMCache's (token hashing, keys, local CPU backend, RemoteBackend, naive serde) and cwm's
(CwmRemoteConnector, KeyedChunkService over gRPC, the chunk store). Needs `.venv-lmcache`
(`make test-lmcache`); in other environments it is skipped.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

lmcache = pytest.importorskip("lmcache")
torch = pytest.importorskip("torch")

from lmcache.utils import mock_up_broadcast_fn, mock_up_broadcast_object_fn  # noqa: E402
from lmcache.v1.cache_engine import LMCacheEngine, LMCacheEngineBuilder  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.gpu_connector.mock_gpu_connector import MockGPUConnector  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402

from cwm_client import KeyedChunkClient, WindowClient, digest, pb  # noqa: E402
from cwm_server.manager.config import ManagerConfig, ServerOptions  # noqa: E402
from cwm_server.manager.server import ManagerServer  # noqa: E402

LAYERS, HEADS, HEAD_DIM, CHUNK = 4, 2, 32, 16
TOKENS = 40  # two full chunks of 16 and one of 8 (save_unfull_chunk)
BYTES_PER_TOKEN = 2 * LAYERS * HEADS * HEAD_DIM * 2  # K+V, bf16


class BufferGPUConnector(MockGPUConnector):  # type: ignore[misc]
    """LMCache's MockGPUConnector over a CPU "paged" buffer in the KV_2LTD layout
    [2, layers, tokens, heads*dim]: `source` is what the engine computed, `target` is where
    a retrieve puts what LMCache loaded."""

    def __init__(self, source: Any) -> None:
        super().__init__((LAYERS, 2, source.shape[2], HEADS, HEAD_DIM))
        self.source = source
        self.target = torch.zeros_like(source)

    def from_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
        memory_obj.tensor.copy_(self.source[:, :, start:end, :])

    def to_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
        self.target[:, :, start:end, :].copy_(memory_obj.tensor)

    def batched_from_gpu(self, memory_objs: Any, starts: Any, ends: Any, **kwargs: Any) -> None:
        for obj, start, end in zip(memory_objs, starts, ends, strict=True):
            self.from_gpu(obj, start, end)

    def batched_to_gpu(self, memory_objs: Any, starts: Any, ends: Any, **kwargs: Any) -> None:
        for obj, start, end in zip(memory_objs, starts, ends, strict=True):
            self.to_gpu(obj, start, end)


class Manager:
    """A real cwm manager on 127.0.0.1:<ephemeral>, with its /metrics endpoint."""

    def __init__(self, config: ManagerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ManagerServer(config, ServerOptions(metrics_listen="127.0.0.1:0"))
        port = self._run(self.server.start())
        self.target = f"127.0.0.1:{port}"

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    def stop(self) -> None:
        self._run(self.server.stop(grace=0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    running = Manager(
        ManagerConfig(data_dir=tmp_path / "data", listen="127.0.0.1:0", memory_cache_bytes=0)
    )
    yield running
    running.stop()


def lmcache_config(target: str) -> Any:
    """What docs/LMCACHE.md tells users to write in their LMCache YAML."""
    return LMCacheEngineConfig.from_defaults(
        chunk_size=CHUNK,
        local_cpu=True,
        max_local_cpu_size=0.05,
        save_unfull_chunk=True,
        remote_serde="naive",
        remote_storage_plugins=["cwm"],
        extra_config={
            "remote_storage_plugin.cwm.module_path": "cwm_server.lmcache.connector",
            "remote_storage_plugin.cwm.class_name": "CwmRemoteConnector",
            "remote_storage_plugin.cwm.target": target,
        },
    )


def metadata() -> Any:
    return LMCacheMetadata(
        model_name="tiny-lmcache",
        world_size=1,
        local_world_size=1,
        worker_id=0,
        local_worker_id=0,
        kv_dtype=torch.bfloat16,
        kv_shape=(LAYERS, 2, CHUNK, HEADS, HEAD_DIM),
        chunk_size=CHUNK,
    )


_engines = iter(range(1_000_000))


def new_engine(target: str, connector: BufferGPUConnector) -> tuple[str, LMCacheEngine]:
    """A fresh LMCacheEngine (its own, empty, local CPU backend) using cwm as remote tier."""
    name = f"cwm-test-{next(_engines)}"
    engine = LMCacheEngineBuilder.get_or_create(
        name,
        lmcache_config(target),
        metadata(),
        connector,
        mock_up_broadcast_fn,
        mock_up_broadcast_object_fn,
    )
    engine.post_init()
    backends = engine.storage_manager.storage_backends
    assert "RemoteBackend-cwm" in backends, list(backends)
    return name, engine


def close_engine(name: str) -> None:
    LMCacheEngineBuilder.destroy(name)


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for LMCache's remote puts")
        time.sleep(0.05)


def kv_buffer(tokens: int, seed: int) -> Any:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(
        (2, LAYERS, tokens, HEADS * HEAD_DIM), generator=generator, dtype=torch.float32
    ).to(torch.bfloat16)


def test_lmcache_stores_in_cwm_and_retrieves_identical_bytes(manager: Manager) -> None:
    token_ids = list(range(1000, 1000 + TOKENS))
    source = kv_buffer(TOKENS, seed=7)

    # 1. LMCache stores: local CPU backend, and asynchronously the cwm remote tier.
    writer_name, writer = new_engine(manager.target, BufferGPUConnector(source))
    keys = [key.to_string() for _, _, key in writer.token_database.process_tokens(token_ids)]
    assert len(keys) == 3
    writer.store(token_ids)
    with KeyedChunkClient(manager.target) as keyed:
        wait_for(lambda: keyed.contains_prefix(keys) == 3)
        listed = {info.key: info for info in keyed.list_keys()}
    close_engine(writer_name)

    assert sorted(listed) == sorted(keys)
    spans = [(0, 16), (16, 32), (32, 40)]
    for key, (start, end) in zip(keys, spans, strict=True):
        expected = source[:, :, start:end, :].contiguous().view(torch.uint8).numpy().tobytes()
        assert listed[key].raw_size == (end - start) * BYTES_PER_TOKEN
        assert listed[key].digest == digest(expected)

    # 2. A fresh engine: nothing local, so LMCache must go to cwm.
    reader_connector = BufferGPUConnector(torch.zeros_like(source))
    reader_name, reader = new_engine(manager.target, reader_connector)
    try:
        local = reader.storage_manager.storage_backends["LocalCPUBackend"]
        assert all(not local.contains(k) for k in reader_keys(reader, token_ids))
        assert reader.lookup(token_ids) == TOKENS
        mask = reader.retrieve(token_ids)
        assert int(mask.sum()) == TOKENS
        assert torch.equal(reader_connector.target.view(torch.int16), source.view(torch.int16))
    finally:
        close_engine(reader_name)

    # 3. The manager saw it: keyed RPCs in its metrics, chunks in its tenant gauges.
    text = manager.metrics()
    assert 'method="cwm.v1.KeyedChunkService/PutKeyedChunks"' in text
    assert 'method="cwm.v1.KeyedChunkService/GetKeyedChunks"' in text
    assert 'method="cwm.v1.KeyedChunkService/ContainsPrefix"' in text


def reader_keys(engine: LMCacheEngine, token_ids: list[int]) -> list[Any]:
    return [key for _, _, key in engine.token_database.process_tokens(token_ids)]


def test_lmcache_chunks_promote_to_a_window_and_thaw(manager: Manager) -> None:
    """KV that LMCache offloaded by key becomes a cwm window (list, thaw, clone, export)."""
    token_ids = list(range(50, 50 + TOKENS))
    source = kv_buffer(TOKENS, seed=11)
    name, engine = new_engine(manager.target, BufferGPUConnector(source))
    try:
        keys = [k.to_string() for k in reader_keys(engine, token_ids)]
        engine.store(token_ids)
        with KeyedChunkClient(manager.target) as keyed:
            wait_for(lambda: keyed.contains_prefix(keys) == 3)
            fingerprint = pb.ModelFingerprint(
                model_id="tiny-lmcache",
                kv_dtype=pb.KvDtype.KV_DTYPE_BFLOAT16,
                num_layers=LAYERS,
                num_kv_heads=HEADS,
                head_dim=HEAD_DIM,
                engine_name="lmcache",
                engine_version="0.5.6",
            )
            window = keyed.promote(
                "lmcache-session",
                keys,
                fingerprint=fingerprint,
                token_ids=token_ids,
                chunk_tokens=CHUNK,
            )
        assert window.chunk_count == 3 and window.token_count == TOKENS
        with WindowClient(manager.target) as windows:
            assert [w.name for w in windows.list()] == ["lmcache-session"]
            with windows.thaw("lmcache-session") as stream:
                thawed = b"".join(c.data for c in stream)
        expected = b"".join(
            source[:, :, s:e, :].contiguous().view(torch.uint8).numpy().tobytes()
            for s, e in [(0, 16), (16, 32), (32, 40)]
        )
        assert thawed == expected
    finally:
        close_engine(name)


def test_corrupt_chunk_is_a_miss_never_wrong_bytes(manager: Manager) -> None:
    token_ids = list(range(7000, 7000 + 32))
    source = kv_buffer(32, seed=5)
    name, engine = new_engine(manager.target, BufferGPUConnector(source))
    keys = [k.to_string() for k in reader_keys(engine, token_ids)]
    engine.store(token_ids)
    with KeyedChunkClient(manager.target) as keyed:
        wait_for(lambda: keyed.contains_prefix(keys) == 2)
        second = next(info for info in keyed.list_keys() if info.key == keys[1])
    close_engine(name)

    # Flip one byte of the second chunk's file on disk (the memory tier is off).
    disk = manager.server.manager.disk
    path = disk.path_for("default", second.digest)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))

    sentinel = torch.full_like(source, 3.0)
    connector = BufferGPUConnector(torch.zeros_like(source))
    connector.target = sentinel.clone()
    name, engine = new_engine(manager.target, connector)
    try:
        mask = engine.retrieve(token_ids)
        # The intact first chunk loads; the corrupt second one is a miss (LMCache recomputes
        # it) and not a byte of it reaches the engine's buffer.
        assert mask.tolist() == [True] * CHUNK + [False] * CHUNK
        assert torch.equal(connector.target[:, :, :CHUNK, :], source[:, :, :CHUNK, :])
        assert torch.equal(connector.target[:, :, CHUNK:, :], sentinel[:, :, CHUNK:, :])
    finally:
        close_engine(name)
