"""Every setting cwm has: its key in the file, its environment variable, its flag, its
default and the check of its value (see the package docstring for the precedence)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cwm_client.channels import DEFAULT_TARGET
from cwm_server.manager.config import default_data_dir
from cwm_server.settings.values import (
    bulk_listen,
    host_port,
    host_port_or_empty,
    log_level,
    non_negative_float,
    non_negative_int,
    parse_bool,
    positive_float,
    positive_int,
    redis_policy,
    redis_prefix,
    redis_urls,
)


@dataclass(frozen=True)
class Setting:
    key: str
    """``section.name`` in the file."""
    kind: type
    """The TOML type the file must use: str, int, float or bool."""
    default: Callable[[], Any]
    help: str
    flag: str = ""
    """The flag of the command that uses it, for the docs and `cwm config show`."""
    check: Callable[[str], Any] = str
    """Parses an environment string (and re-checks file values) into the value."""

    @property
    def section(self) -> str:
        return self.key.partition(".")[0]

    @property
    def name(self) -> str:
        return self.key.partition(".")[2]

    @property
    def env(self) -> str:
        return "CWM_" + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "client.manager",
        str,
        lambda: DEFAULT_TARGET,
        "manager address for client commands (cwm ls, freeze, status, ...)",
        "--manager",
        host_port,
    ),
    Setting(
        "client.token",
        str,
        lambda: "",
        "bearer token client commands, agents and the MCP bridge send (`cwm auth token`)",
        "--token",
    ),
    Setting(
        "client.tls_ca",
        str,
        lambda: "",
        "PEM CA bundle of the manager's TLS certificate; set: client commands use TLS",
        "--tls-ca",
    ),
    Setting(
        "client.tls_client_cert",
        str,
        lambda: "",
        "PEM client certificate for a manager that requires one (mutual TLS)",
        "--tls-cert",
    ),
    Setting(
        "client.tls_client_key",
        str,
        lambda: "",
        "PEM key of the client certificate",
        "--tls-key",
    ),
    Setting(
        "serve.data_dir",
        str,
        lambda: str(default_data_dir()),
        "where the manager keeps windows (catalog and chunk files)",
        "--data-dir",
    ),
    Setting(
        "serve.listen",
        str,
        lambda: "127.0.0.1:50051",
        "gRPC address HOST:PORT (port 0: any free port)",
        "--listen",
        host_port,
    ),
    Setting(
        "serve.bulk_listen",
        str,
        lambda: "auto",
        "bulk TCP port HOST:PORT for Freeze/Thaw bytes (TLS when gRPC is); auto: the gRPC "
        "port + 1 on the same host; off: none",
        "--bulk-listen",
        bulk_listen,
    ),
    Setting(
        "serve.bulk_unix",
        bool,
        lambda: True,
        "offer callers on this host the Unix socket <data_dir>/bulk.sock for Freeze/Thaw bytes",
        "--no-bulk-unix",
        parse_bool,
    ),
    Setting(
        "serve.metrics",
        str,
        lambda: "",
        "Prometheus endpoint HOST:PORT serving /metrics; empty: none",
        "--metrics",
        host_port_or_empty,
    ),
    Setting(
        "serve.memory_cache_mib",
        int,
        lambda: 256,
        "byte cap of the hot in-memory tier, MiB (0 disables it)",
        "--memory-cache-mib",
        non_negative_int,
    ),
    Setting(
        "serve.stream_window_chunks",
        int,
        lambda: 4,
        "chunks of one stream held in memory (freeze staging, thaw read-ahead)",
        "--stream-window-chunks",
        positive_int,
    ),
    Setting(
        "serve.max_chunk_mib",
        int,
        lambda: 64,
        "largest chunk accepted, MiB",
        "--max-chunk-mib",
        positive_int,
    ),
    Setting(
        "serve.compress",
        bool,
        lambda: True,
        "store chunks byte-plane+zstd compressed when that saves >= 10%",
        "--no-compress",
        parse_bool,
    ),
    Setting(
        "serve.fsync",
        bool,
        lambda: True,
        "fsync chunk files before a window commits (false: faster, not crash-safe)",
        "--no-fsync",
        parse_bool,
    ),
    Setting(
        "serve.io_threads",
        int,
        lambda: 4,
        "threads for disk I/O and digest checks",
        "--io-threads",
        positive_int,
    ),
    Setting(
        "serve.health_interval_seconds",
        float,
        lambda: 5.0,
        "seconds between health checks of the tiers and the catalog",
        "--health-interval",
        positive_float,
    ),
    Setting(
        "serve.min_free_mib",
        int,
        lambda: 1024,
        "free space on the data dir's filesystem below which the disk tier is DEGRADED, MiB",
        "--min-free-mib",
        non_negative_int,
    ),
    Setting(
        "serve.quota_file",
        str,
        lambda: "",
        "TOML file of per-tenant quotas (max_bytes, max_windows); empty: no quotas",
        "--quota-file",
    ),
    Setting(
        "serve.key_file",
        str,
        lambda: "",
        "TOML file of per-tenant AES-256 keys: chunks of those tenants are encrypted at rest",
        "--key-file",
    ),
    Setting(
        "serve.ttl_interval_seconds",
        float,
        lambda: 30.0,
        "seconds between sweeps of the TTL collector that deletes expired windows",
        "--ttl-interval",
        positive_float,
    ),
    Setting(
        "serve.scrub_interval_seconds",
        float,
        lambda: 0.0,
        "seconds between passes of the scrubber that reads and verifies every chunk file, "
        "quarantining corrupt ones (0: off)",
        "--scrub-interval",
        non_negative_float,
    ),
    Setting(
        "serve.scrub_mib_per_s",
        float,
        lambda: 64.0,
        "how fast a scrub pass reads chunk files, at most (MiB/s)",
        "--scrub-mib-per-s",
        positive_float,
    ),
    Setting(
        "serve.upload_ttl_seconds",
        float,
        lambda: 600.0,
        "seconds an upload (a parallel freeze's staged streams) may stay open without a "
        "stream before its staged chunks are collected",
        "--upload-ttl",
        positive_float,
    ),
    Setting(
        "serve.redis_url",
        str,
        lambda: "",
        "Redis tier URL: redis://, rediss:// or unix:// (a cluster: seeds, comma-separated)",
        "--redis-url",
        redis_urls,
    ),
    Setting(
        "serve.redis_cluster",
        bool,
        lambda: False,
        "the Redis URLs are seed nodes of a Redis Cluster",
        "--redis-cluster",
        parse_bool,
    ),
    Setting(
        "serve.redis_catalog",
        bool,
        lambda: False,
        "keep the window catalog in Redis, shared by every manager on it (needs redis_url)",
        "--redis-catalog",
        parse_bool,
    ),
    Setting(
        "serve.redis_policy",
        str,
        lambda: "write-through",
        "write-through (disk and Redis) or redis-only (Redis is the durable tier, no chunk files)",
        "--redis-policy",
        redis_policy,
    ),
    Setting(
        "serve.redis_timeout_seconds",
        float,
        lambda: 0.5,
        "Redis connect/read timeout; after a failure Redis calls fail at once until it is back",
        "--redis-timeout",
        positive_float,
    ),
    Setting(
        "serve.redis_prefix",
        str,
        lambda: "cwm",
        "first part of every Redis key (fleets sharing one Redis use different prefixes)",
        "--redis-prefix",
        redis_prefix,
    ),
    Setting(
        "serve.log_level",
        str,
        lambda: "INFO",
        "log level of the manager's JSON log on stderr",
        "--log-level",
        log_level,
    ),
    Setting(
        "serve.auth_file",
        str,
        lambda: "",
        "TOML/JSON file of token hashes -> tenant and role; empty: no authentication",
        "--auth-file",
    ),
    Setting(
        "serve.tls_cert",
        str,
        lambda: "",
        "PEM certificate chain of the manager; with serve.tls_key the port speaks TLS",
        "--tls-cert",
    ),
    Setting(
        "serve.tls_key",
        str,
        lambda: "",
        "PEM private key of the manager's certificate",
        "--tls-key",
    ),
    Setting(
        "serve.tls_client_ca",
        str,
        lambda: "",
        "PEM CA of client certificates; set: mutual TLS, cwm://TENANT/ROLE certs authenticate",
        "--tls-client-ca",
    ),
)
BY_KEY = {s.key: s for s in SETTINGS}
BY_ENV = {s.env: s for s in SETTINGS}
assert len(BY_ENV) == len(SETTINGS), "setting names must be unique across sections"
