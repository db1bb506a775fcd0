"""cwm as LMCache's remote tier: a `RemoteConnector` that LMCache loads by configuration.

    remote_storage_plugins: ["cwm"]
    extra_config:
      remote_storage_plugin.cwm.module_path: cwm_server.lmcache.connector
      remote_storage_plugin.cwm.class_name: CwmRemoteConnector
      remote_storage_plugin.cwm.target: 127.0.0.1:50051

Each LMCache chunk is stored with KeyedChunkService under its key's
`CacheEngineKey.to_string()`; its bytes become a content-addressed cwm chunk (deduplicated,
tiered, verified), and LMCache's own RemoteMetadata (length, shapes, dtypes, format) travels
beside them as opaque metadata, so a read allocates exactly the memory object LMCache wrote.
Every value is checked against its BLAKE3 digest by the SDK before a byte of it is copied
into LMCache's memory: a failed or corrupt read is a miss (None) and a log line, never
wrong bytes.

The connector uses the blocking SDK on a small thread pool rather than grpc.aio: LMCache
calls the async methods on its own event loop thread and the sync ones (`exists_sync`,
`batched_contains`) from other threads, and a blocking channel serves every thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from lmcache.utils import CacheEngineKey
from lmcache.v1.memory_management import MemoryObj
from lmcache.v1.protocol import RemoteMetadata
from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector

from cwm_client.channels import DEFAULT_TARGET
from cwm_client.keyed import KeyedChunkClient, KeyedValue

log = logging.getLogger("cwm.lmcache")

T = TypeVar("T")

PLUGIN_NAME = "cwm"
"""The plugin name the docs use; any name works (the connector finds its own entry)."""


def _plugin_name(config: Any) -> str:
    """The name this connector was configured under in `remote_storage_plugins`.

    LMCache's DynamicConnectorAdapter does not pass the name in, so it is the first plugin
    whose module_path is this module (or "cwm")."""
    extra = getattr(config, "extra_config", None) or {}
    for name in getattr(config, "remote_storage_plugins", None) or []:
        if extra.get(f"remote_storage_plugin.{name}.module_path") == __name__:
            return str(name)
    return PLUGIN_NAME


class CwmRemoteConnector(RemoteConnector):  # type: ignore[misc]
    """LMCache remote connector backed by a cwm manager's KeyedChunkService."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        local_cpu_backend: Any,
        config: Any = None,
        plugin_name: str | None = None,
        client: KeyedChunkClient | None = None,
    ) -> None:
        super().__init__(local_cpu_backend.config, local_cpu_backend.metadata)
        config = config if config is not None else local_cpu_backend.config
        self.loop = loop
        self.local_cpu_backend = local_cpu_backend
        self.plugin_name = plugin_name or _plugin_name(config)
        extra = getattr(config, "extra_config", None) or {}
        prefix = f"remote_storage_plugin.{self.plugin_name}."

        def option(name: str, default: str) -> str:
            return str(extra.get(prefix + name, default))

        self.target = option("target", os.environ.get("CWM_TARGET", DEFAULT_TARGET))
        timeout = float(option("timeout_s", "30"))
        token = option("token", os.environ.get("CWM_TOKEN", ""))
        metadata = [("authorization", f"Bearer {token}")] if token else []
        self._client = client or KeyedChunkClient(self.target, timeout=timeout, metadata=metadata)
        self._pool = ThreadPoolExecutor(
            int(option("threads", "4")), thread_name_prefix="cwm-lmcache"
        )
        log.info("cwm remote connector for %s (plugin %r)", self.target, self.plugin_name)

    def __repr__(self) -> str:
        return f"<CwmRemoteConnector {self.target}>"

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- lookups --------------------------------------------------------------------------

    async def exists(self, key: CacheEngineKey) -> bool:
        return await self._call(self.exists_sync, key)

    def exists_sync(self, key: CacheEngineKey) -> bool:
        return self._prefix([key]) == 1

    def support_batched_contains(self) -> bool:
        return True

    def batched_contains(self, keys: list[CacheEngineKey]) -> int:
        return self._prefix(keys)

    def support_batched_async_contains(self) -> bool:
        return True

    async def batched_async_contains(
        self, lookup_id: str, keys: list[CacheEngineKey], pin: bool = False
    ) -> int:
        """How many leading keys the manager holds: one ContainsPrefix round trip."""
        del lookup_id, pin
        return await self._call(self._prefix, keys)

    def _prefix(self, keys: Sequence[CacheEngineKey]) -> int:
        if not keys:
            return 0
        try:
            return self._client.contains_prefix([k.to_string() for k in keys])
        except Exception:
            log.warning("cwm contains failed; answering 0", exc_info=True)
            return 0

    async def list(self) -> list[str]:
        return await self._call(lambda: [info.key for info in self._client.list_keys()])

    # -- reads ----------------------------------------------------------------------------

    async def get(self, key: CacheEngineKey) -> MemoryObj | None:
        found = await self._call(self._get_many, [key])
        return found[0]

    def support_batched_get(self) -> bool:
        return True

    async def batched_get(self, keys: list[CacheEngineKey]) -> list[MemoryObj | None]:
        return await self._call(self._get_many, keys)

    def support_batched_get_non_blocking(self) -> bool:
        return True

    async def batched_get_non_blocking(
        self, lookup_id: str, keys: list[CacheEngineKey]
    ) -> list[MemoryObj]:
        """The leading keys' memory objects up to the first miss (one round trip)."""
        del lookup_id
        found = await self._call(self._get_many, keys)
        prefix: list[MemoryObj] = []
        for obj in found:
            if obj is None:
                break
            prefix.append(obj)
        for obj in found[len(prefix) :]:
            if obj is not None:
                obj.ref_count_down()
        return prefix

    def _get_many(self, keys: Sequence[CacheEngineKey]) -> list[MemoryObj | None]:
        names = [k.to_string() for k in keys]
        try:
            values = self._client.get(names)
        except Exception:
            log.warning("cwm get of %d keys failed", len(keys), exc_info=True)
            values = self._get_each(names) if len(names) > 1 else [None]
        return [self._to_memory_obj(v) if v is not None else None for v in values]

    def _get_each(self, names: Sequence[str]) -> list[KeyedValue | None]:
        """After a batch failed (one corrupt chunk fails its whole stream): key by key, so
        the intact ones still load and only the bad ones are misses."""
        values: list[KeyedValue | None] = []
        for name in names:
            try:
                values.append(self._client.get([name])[0])
            except Exception:
                log.warning("cwm get of key %s failed; miss", name[:120], exc_info=True)
                values.append(None)
        return values

    def _to_memory_obj(self, value: KeyedValue) -> MemoryObj | None:
        """Copy a verified value into a memory object LMCache allocates; None if it cannot
        be placed exactly (then nothing is handed over)."""
        memory_obj = None
        try:
            if value.metadata:
                meta = RemoteMetadata.deserialize(value.metadata)
                if meta.length != len(value.data):
                    raise ValueError(
                        f"metadata says {meta.length} bytes, the value has {len(value.data)}"
                    )
                memory_obj = self.local_cpu_backend.allocate(meta.shapes, meta.dtypes, meta.fmt)
                if memory_obj is None:
                    log.debug("LMCache could not allocate %d bytes", len(value.data))
                    return None
            else:
                memory_obj = self.local_cpu_backend.allocate(
                    self.meta_shapes, self.meta_dtypes, self.meta_fmt
                )
                if memory_obj is None:
                    return None
                memory_obj = self.reshape_partial_chunk(memory_obj, len(value.data))
            buffer = memoryview(memory_obj.byte_array)
            if buffer.format != "B":  # LMCache's byte_array may be "<B", which cannot be assigned
                buffer = buffer.cast("B")
            if buffer.nbytes != len(value.data):
                raise ValueError(
                    f"LMCache allocated {buffer.nbytes} bytes for a {len(value.data)}-byte value"
                )
            buffer[:] = value.data
            return memory_obj
        except Exception:
            log.warning("cwm value of key %s is unusable; miss", value.key[:120], exc_info=True)
            if memory_obj is not None:
                memory_obj.ref_count_down()
            return None

    # -- writes ---------------------------------------------------------------------------

    async def put(self, key: CacheEngineKey, memory_obj: MemoryObj) -> None:
        await self._call(self._put_many, [key], [memory_obj])

    def support_batched_put(self) -> bool:
        return True

    async def batched_put(self, keys: list[CacheEngineKey], memory_objs: list[MemoryObj]) -> None:
        await self._call(self._put_many, keys, memory_objs)

    def _put_many(self, keys: Sequence[CacheEngineKey], memory_objs: Sequence[MemoryObj]) -> None:
        values = [self._to_value(k, m) for k, m in zip(keys, memory_objs, strict=True)]
        try:
            self._client.put(values)
        except Exception:
            log.warning("cwm put of %d keys failed", len(values), exc_info=True)
            raise

    @staticmethod
    def _to_value(key: CacheEngineKey, memory_obj: MemoryObj) -> KeyedValue:
        data = bytes(memory_obj.byte_array)
        dtypes = memory_obj.get_dtypes()
        meta = RemoteMetadata(
            len(data), memory_obj.get_shapes(), dtypes, memory_obj.get_memory_format()
        )
        word = dtypes[0].itemsize if dtypes and dtypes[0].itemsize in (1, 2, 4) else 0
        return KeyedValue(key.to_string(), data, metadata=meta.serialize(), word_size=word)

    def remove_sync(self, key: CacheEngineKey) -> bool:
        try:
            return self._client.delete([key.to_string()]).keys_deleted == 1
        except Exception:
            log.warning("cwm delete failed", exc_info=True)
            return False

    async def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._client.close()
