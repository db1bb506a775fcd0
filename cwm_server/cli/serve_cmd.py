"""`cwm serve`: run the manager.

Every option can also come from the config file or a `CWM_*` variable (see
`cwm_server.config`; flags win over the environment, which wins over the file).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from cwm_server import config as cwm_config
from cwm_server.cli.options import Subparsers, add_command
from cwm_server.logs import configure_logging

MiB = 1 << 20

# flag dest -> setting key; flags default to None so that "not given" falls through to the
# environment, the file and the defaults.
FLAG_KEYS = {
    "data_dir": "serve.data_dir",
    "listen": "serve.listen",
    "metrics": "serve.metrics",
    "memory_cache_mib": "serve.memory_cache_mib",
    "stream_window_chunks": "serve.stream_window_chunks",
    "max_chunk_mib": "serve.max_chunk_mib",
    "compress": "serve.compress",
    "fsync": "serve.fsync",
    "io_threads": "serve.io_threads",
    "health_interval": "serve.health_interval_seconds",
    "min_free_mib": "serve.min_free_mib",
    "log_level": "serve.log_level",
}


def flags_of(args: argparse.Namespace) -> dict[str, object]:
    return {key: getattr(args, dest, None) for dest, key in FLAG_KEYS.items()}


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        effective = cwm_config.load(flags_of(args), args.config)
    except cwm_config.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from cwm_server.manager.server import ServerOptions, serve

    configure_logging("json", effective["serve.log_level"])
    options = ServerOptions(
        metrics_listen=effective["serve.metrics"],
        health_interval_s=effective["serve.health_interval_seconds"],
        min_free_bytes=effective["serve.min_free_mib"] * MiB,
    )
    port_file = Path(args.port_file) if args.port_file else None
    asyncio.run(serve(cwm_config.manager_config(effective), port_file, options))
    return 0


def _host_port(value: str) -> str:
    try:
        return cwm_config._host_port(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(sub: Subparsers) -> None:
    serve_p = add_command(sub, "serve", help="run the manager (gRPC WindowService)")
    serve_p.add_argument(
        "--config",
        metavar="FILE",
        help="TOML config file (default: $CWM_CONFIG, else ~/.config/cwm/config.toml if present)",
    )
    serve_p.add_argument("--data-dir", help="where windows live (default ~/.local/share/cwm)")
    serve_p.add_argument(
        "--listen", type=_host_port, help="HOST:PORT (port 0: any; default 127.0.0.1:50051)"
    )
    serve_p.add_argument(
        "--port-file", help="write the bound port here once serving (for scripts and tests)"
    )
    serve_p.add_argument(
        "--metrics",
        type=_host_port,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics",
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
    serve_p.add_argument(
        "--log-level", type=str.upper, choices=cwm_config.LOG_LEVELS, help="default INFO"
    )
    serve_p.set_defaults(handler=cmd_serve, needs_client=False)
