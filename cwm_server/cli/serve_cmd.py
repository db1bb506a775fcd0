"""`cwm serve`: run the manager.

Every option can also come from the config file or a `CWM_*` variable (see
`cwm_server.settings`; flags win over the environment, which wins over the file).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from cwm_server.cli.options import Subparsers, add_command, argument_type
from cwm_server.logs import configure_logging
from cwm_server.manager.config import ManagerConfig
from cwm_server.settings.loading import ConfigError, load
from cwm_server.settings.serve import manager_config, server_options
from cwm_server.settings.values import LOG_LEVELS, bulk_listen, host_port

# flag dest -> setting key; flags default to None so that "not given" falls through to the
# environment, the file and the defaults.
FLAG_KEYS = {
    "data_dir": "serve.data_dir",
    "listen": "serve.listen",
    "metrics": "serve.metrics",
    "bulk_listen": "serve.bulk_listen",
    "bulk_unix": "serve.bulk_unix",
    "memory_cache_mib": "serve.memory_cache_mib",
    "stream_window_chunks": "serve.stream_window_chunks",
    "max_chunk_mib": "serve.max_chunk_mib",
    "compress": "serve.compress",
    "fsync": "serve.fsync",
    "io_threads": "serve.io_threads",
    "health_interval": "serve.health_interval_seconds",
    "min_free_mib": "serve.min_free_mib",
    "log_level": "serve.log_level",
    "auth_file": "serve.auth_file",
    "tls_cert": "serve.tls_cert",
    "tls_key": "serve.tls_key",
    "tls_client_ca": "serve.tls_client_ca",
    "quota_file": "serve.quota_file",
    "key_file": "serve.key_file",
    "ttl_interval": "serve.ttl_interval_seconds",
    "scrub_interval": "serve.scrub_interval_seconds",
    "scrub_mib_per_s": "serve.scrub_mib_per_s",
    "upload_ttl": "serve.upload_ttl_seconds",
    "redis_url": "serve.redis_url",
    "redis_cluster": "serve.redis_cluster",
    "redis_catalog": "serve.redis_catalog",
    "redis_policy": "serve.redis_policy",
    "redis_timeout": "serve.redis_timeout_seconds",
    "redis_prefix": "serve.redis_prefix",
}


def flags_of(args: argparse.Namespace) -> dict[str, object]:
    return {key: getattr(args, dest, None) for dest, key in FLAG_KEYS.items()}


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        effective = load(flags_of(args), args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from cwm_server.manager.rpc.transport_security import check_server_options
    from cwm_server.manager.server import StartupError, serve

    configure_logging("json", effective["serve.log_level"])
    options = server_options(effective)
    try:
        check_server_options(options)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = manager_config(effective)
    if problem := _check_policy_files(config):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    port_file = Path(args.port_file) if args.port_file else None
    try:
        asyncio.run(serve(config, port_file, options))
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _check_policy_files(config: ManagerConfig) -> str:
    """Why the quota or key file cannot be used (empty if they can), before serving."""
    from cwm_server.manager.quotas import QuotaFileError, QuotaPolicy
    from cwm_server.manager.tiers.sealing import KeyFileError, Keyring

    try:
        if config.quota_file is not None:
            QuotaPolicy.load(config.quota_file)
        if config.key_file is not None:
            Keyring.load(config.key_file)
    except (QuotaFileError, KeyFileError) as exc:
        return str(exc)
    return ""


def add_parser(sub: Subparsers) -> None:
    serve_p = add_command(sub, "serve", help="run the manager (gRPC WindowService)", client=False)
    serve_p.add_argument(
        "--config",
        metavar="FILE",
        help="TOML config file (default: $CWM_CONFIG, else ~/.config/cwm/config.toml if present)",
    )
    serve_p.add_argument("--data-dir", help="where windows live (default ~/.local/share/cwm)")
    serve_p.add_argument(
        "--listen",
        type=argument_type(host_port),
        help="HOST:PORT (port 0: any; default 127.0.0.1:50051)",
    )
    serve_p.add_argument(
        "--port-file", help="write the bound port here once serving (for scripts and tests)"
    )
    serve_p.add_argument(
        "--metrics",
        type=argument_type(host_port),
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics",
    )
    serve_p.add_argument(
        "--bulk-listen",
        type=argument_type(bulk_listen),
        metavar="HOST:PORT|auto|off",
        help="bulk TCP port for Freeze/Thaw bytes, TLS when gRPC is (default auto: the gRPC "
        "port + 1)",
    )
    serve_p.add_argument(
        "--no-bulk-unix",
        dest="bulk_unix",
        action="store_const",
        const=False,
        help="do not offer same-host callers the Unix socket <data-dir>/bulk.sock",
    )
    serve_p.add_argument("--memory-cache-mib", type=int, help="hot tier cap (default 256)")
    serve_p.add_argument(
        "--stream-window-chunks",
        type=int,
        help="chunks of one stream held in memory (freeze staging, thaw read-ahead; default 4)",
    )
    serve_p.add_argument("--max-chunk-mib", type=int, help="largest chunk accepted (default 64)")
    serve_p.add_argument(
        "--no-compress",
        dest="compress",
        action="store_const",
        const=False,
        help="store chunks raw on disk",
    )
    serve_p.add_argument(
        "--no-fsync",
        dest="fsync",
        action="store_const",
        const=False,
        help="skip fsync (faster, not crash-safe)",
    )
    serve_p.add_argument("--io-threads", type=int, help="disk I/O and hashing threads (default 4)")
    serve_p.add_argument(
        "--health-interval",
        type=float,
        metavar="SECONDS",
        help="seconds between health checks (default 5)",
    )
    serve_p.add_argument(
        "--min-free-mib",
        type=int,
        help="free space below which the disk tier reports DEGRADED (default 1024)",
    )
    serve_p.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, help="default INFO")
    redis = serve_p.add_argument_group("Redis (shared tier and fleet catalog; docs/OPERATIONS.md)")
    redis.add_argument(
        "--redis-url",
        metavar="URL",
        help="Redis tier: redis://HOST:PORT, rediss://HOST:PORT or unix:///PATH; with "
        "--redis-cluster one or more seed URLs separated by commas",
    )
    redis.add_argument(
        "--redis-cluster",
        action="store_const",
        const=True,
        help="the --redis-url seeds are nodes of a Redis Cluster",
    )
    redis.add_argument(
        "--redis-catalog",
        action="store_const",
        const=True,
        help="keep the window catalog in Redis, shared by every manager on it (fleet mode)",
    )
    redis.add_argument(
        "--redis-policy",
        choices=("write-through", "redis-only"),
        help="write-through: chunks to disk and Redis (default); redis-only: Redis is the "
        "durable tier, no chunk files",
    )
    redis.add_argument(
        "--redis-timeout",
        type=float,
        metavar="SECONDS",
        help="Redis connect/read timeout (default 0.5)",
    )
    redis.add_argument("--redis-prefix", help="first part of every Redis key (default cwm)")
    serve_p.add_argument(
        "--quota-file",
        metavar="FILE",
        help="TOML per-tenant quotas ([default] and [tenants.NAME]: max_bytes, max_windows)",
    )
    serve_p.add_argument(
        "--key-file",
        metavar="FILE",
        help="TOML per-tenant AES-256-GCM keys: those tenants' chunks are encrypted at rest",
    )
    serve_p.add_argument(
        "--ttl-interval",
        type=float,
        metavar="SECONDS",
        help="seconds between sweeps deleting expired windows (default 30)",
    )
    serve_p.add_argument(
        "--scrub-interval",
        type=float,
        metavar="SECONDS",
        help="seconds between background passes that read and verify every chunk file, "
        "quarantining corrupt ones (default 0: off)",
    )
    serve_p.add_argument(
        "--scrub-mib-per-s",
        type=float,
        metavar="MIB",
        help="how fast a scrub pass reads, at most (default 64)",
    )
    serve_p.add_argument(
        "--upload-ttl",
        type=float,
        metavar="SECONDS",
        help="seconds an upload (the staged streams of a parallel freeze) may stay open "
        "without a stream before its staged chunks are collected (default 600)",
    )
    serve_p.add_argument(
        "--auth-file",
        metavar="FILE",
        help="TOML/JSON token hashes -> tenant and role (`cwm auth token`); without it (and "
        "without --tls-client-ca) every call is tenant 'default' as admin",
    )
    serve_p.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate")
    serve_p.add_argument("--tls-key", metavar="PEM", help="the key of --tls-cert")
    serve_p.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        help="require client certificates signed by this CA (mutual TLS); a certificate "
        "with SAN URI cwm://TENANT/ROLE authenticates as that tenant and role",
    )
    serve_p.set_defaults(handler=cmd_serve, needs_client=False)
