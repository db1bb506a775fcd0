"""`cwm serve`: run the manager."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from cwm_server.cli.options import Subparsers, add_command
from cwm_server.logs import configure_logging
from cwm_server.manager.config import ManagerConfig, MiB, default_data_dir
from cwm_server.manager.server import serve


def cmd_serve(args: argparse.Namespace) -> int:
    configure_logging("json", args.log_level)
    config = ManagerConfig(
        data_dir=Path(args.data_dir).expanduser(),
        listen=args.listen,
        memory_cache_bytes=args.memory_cache_mib * MiB,
        stream_window_chunks=args.stream_window_chunks,
        max_chunk_bytes=args.max_chunk_mib * MiB,
        compress=not args.no_compress,
        fsync=not args.no_fsync,
    )
    port_file = Path(args.port_file) if args.port_file else None
    asyncio.run(serve(config, port_file))
    return 0


def add_parser(sub: Subparsers) -> None:
    serve_p = add_command(sub, "serve", help="run the manager (gRPC WindowService)")
    serve_p.add_argument("--data-dir", default=str(default_data_dir()), help="where windows live")
    serve_p.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT (port 0: any)")
    serve_p.add_argument(
        "--port-file", help="write the bound port here once serving (for scripts and tests)"
    )
    serve_p.add_argument("--memory-cache-mib", type=int, default=256, help="hot tier cap")
    serve_p.add_argument(
        "--stream-window-chunks",
        type=int,
        default=4,
        help="chunks of one stream held in memory (freeze staging, thaw read-ahead)",
    )
    serve_p.add_argument("--max-chunk-mib", type=int, default=64, help="largest chunk accepted")
    serve_p.add_argument("--no-compress", action="store_true", help="store chunks raw on disk")
    serve_p.add_argument(
        "--no-fsync", action="store_true", help="skip fsync (faster, not crash-safe)"
    )
    serve_p.add_argument("--log-level", default="INFO")
    serve_p.set_defaults(handler=cmd_serve, needs_client=False)
