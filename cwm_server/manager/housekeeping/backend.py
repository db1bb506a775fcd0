"""The storage a manager's configuration asks for, chosen once when it starts: the link to
Redis (if any), the catalog, the tiers behind the chunk store, and the collection strategy
that fits the catalog.

    no --redis-url                 SqliteCatalog, memory + disk,          LocalCollector
    --redis-url                    SqliteCatalog, memory + disk + Redis,  LocalCollector
                                   (Redis copies best-effort; deletes Redis missed are
                                   listed in the catalog and retried)
    --redis-url --redis-catalog    RedisCatalog,  memory + disk + Redis,  SharedCollector
                                   (Redis required; collection through claims)
    --redis-policy redis-only      no chunk files: Redis is the durable tier

Nothing after this asks which catalog or collector it has: both are used through their
abstract bases (`catalog.base.WindowCatalog`, `collector.Collector`).
"""

from __future__ import annotations

from dataclasses import dataclass

from cwm_server.manager.catalog.base import WindowCatalog
from cwm_server.manager.catalog.keyed import KeyedCatalog
from cwm_server.manager.catalog.redis import RedisCatalog
from cwm_server.manager.catalog.sqlite import SqliteCatalog
from cwm_server.manager.config import ManagerConfig
from cwm_server.manager.executors import Executors
from cwm_server.manager.housekeeping.collector import Collector, LocalCollector, SharedCollector
from cwm_server.manager.housekeeping.pins import PinTable
from cwm_server.manager.tiers.disk import DiskTier
from cwm_server.manager.tiers.memory import MemoryTier
from cwm_server.manager.tiers.quarantine import Quarantine
from cwm_server.manager.tiers.redis import RedisTier
from cwm_server.manager.tiers.redis_link import RedisLink, parse_urls
from cwm_server.manager.tiers.sealing import Keyring
from cwm_server.manager.tiers.store import ChunkStore

CATALOG_FILE = "catalog.sqlite"
REDIS_POLICIES = ("write-through", "redis-only")


@dataclass(frozen=True)
class Backend:
    redis: RedisLink | None
    """The link to Redis (None without a Redis tier), shared by the tier and the catalog."""
    catalog: WindowCatalog
    keyed_catalog: KeyedCatalog | None
    """The key rows of KeyedChunkService; only the embedded SQLite catalog has them."""
    disk: DiskTier
    memory: MemoryTier
    store: ChunkStore
    collector: Collector


def open_backend(config: ManagerConfig, pins: PinTable, executors: Executors) -> Backend:
    """Open what `config` asks for (ValueError, naming the flag, for settings that cannot
    work together). The data dir must exist."""
    redis, redis_tier = _open_redis(config)
    disk = DiskTier(config.data_dir, fsync=config.fsync)
    memory = MemoryTier(config.memory_cache_bytes)
    store = ChunkStore(
        disk,
        memory,
        compress=config.compress,
        redis=redis_tier,
        disk_enabled=config.redis_policy != "redis-only",
        redis_required=config.redis_catalog,
    )
    store.quarantine = Quarantine(config.data_dir)
    if config.key_file is not None:
        store.keyring = Keyring.load(config.key_file)
    if redis is not None and config.redis_catalog:
        shared = RedisCatalog(
            redis, prefix=config.redis_prefix, bytes_present=store.ensure_in_redis
        )
        return Backend(
            redis,
            shared,
            None,
            disk,
            memory,
            store,
            SharedCollector(shared, store, pins, executors),
        )
    local = SqliteCatalog(config.data_dir / CATALOG_FILE)
    return Backend(
        redis,
        local,
        KeyedCatalog(local),
        disk,
        memory,
        store,
        LocalCollector(local, store, pins, executors),
    )


def _open_redis(config: ManagerConfig) -> tuple[RedisLink | None, RedisTier | None]:
    """The link to Redis and the chunk tier on it, if the configuration names Redis."""
    if not config.redis_url:
        if config.redis_catalog or config.redis_policy == "redis-only":
            raise ValueError("--redis-catalog and --redis-policy redis-only need --redis-url")
        return None, None
    if config.redis_policy not in REDIS_POLICIES:
        raise ValueError(
            f"redis policy must be one of {', '.join(REDIS_POLICIES)}, got {config.redis_policy!r}"
        )
    link = RedisLink(
        parse_urls(config.redis_url),
        cluster=config.redis_cluster,
        timeout_s=config.redis_timeout_s,
        retry_after_s=max(0.2, config.redis_timeout_s),
    )
    return link, RedisTier(link, prefix=config.redis_prefix)
