"""The manager's settings (``[serve]``) as the objects `cwm serve` runs with."""

from __future__ import annotations

from pathlib import Path

from cwm_server.manager.config import ManagerConfig, MiB, ServerOptions
from cwm_server.settings.loading import Effective


def manager_config(effective: Effective) -> ManagerConfig:
    return ManagerConfig(
        data_dir=Path(effective["serve.data_dir"]).expanduser(),
        listen=effective["serve.listen"],
        memory_cache_bytes=effective["serve.memory_cache_mib"] * MiB,
        stream_window_chunks=effective["serve.stream_window_chunks"],
        max_chunk_bytes=effective["serve.max_chunk_mib"] * MiB,
        compress=effective["serve.compress"],
        fsync=effective["serve.fsync"],
        io_threads=effective["serve.io_threads"],
        quota_file=_optional_path(effective["serve.quota_file"]),
        key_file=_optional_path(effective["serve.key_file"]),
        ttl_interval_s=effective["serve.ttl_interval_seconds"],
        scrub_interval_s=effective["serve.scrub_interval_seconds"],
        scrub_mib_per_s=effective["serve.scrub_mib_per_s"],
        upload_ttl_s=effective["serve.upload_ttl_seconds"],
        redis_url=effective["serve.redis_url"],
        redis_cluster=effective["serve.redis_cluster"],
        redis_catalog=effective["serve.redis_catalog"],
        redis_policy=effective["serve.redis_policy"],
        redis_timeout_s=effective["serve.redis_timeout_seconds"],
        redis_prefix=effective["serve.redis_prefix"],
    )


def _optional_path(value: str) -> Path | None:
    return Path(value).expanduser() if value else None


def server_options(effective: Effective) -> ServerOptions:
    """How the manager reports on itself and admits callers (empty file settings: None)."""
    return ServerOptions(
        metrics_listen=effective["serve.metrics"],
        health_interval_s=effective["serve.health_interval_seconds"],
        min_free_bytes=effective["serve.min_free_mib"] * MiB,
        auth_file=_optional_path(effective["serve.auth_file"]),
        tls_cert=_optional_path(effective["serve.tls_cert"]),
        tls_key=_optional_path(effective["serve.tls_key"]),
        tls_client_ca=_optional_path(effective["serve.tls_client_ca"]),
        bulk_listen=effective["serve.bulk_listen"],
        bulk_unix=effective["serve.bulk_unix"],
    )
