"""`cwm mcp`: the MCP bridge, over stdio (default) or streamable HTTP (`--http HOST:PORT`).

On stdio, stdout carries the protocol and nothing else: logs go to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys

from cwm_client.channels import DEFAULT_TARGET
from cwm_server.cli.options import Subparsers, add_auth_options, client_credentials
from cwm_server.settings.values import LOG_LEVELS


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def cmd_mcp(args: argparse.Namespace) -> int:
    try:
        import anyio

        from cwm_server.mcp import serve_http, serve_stdio
    except ImportError as exc:
        print(
            f"error: the MCP bridge needs the mcp extra ({exc.name} is missing): "
            "pip install 'cwm[mcp]'",
            file=sys.stderr,
        )
        return 1
    from cwm_server.logs import configure_logging

    configure_logging("human", args.log_level)
    credentials = client_credentials(args)
    if args.http is None:
        anyio.run(
            lambda: serve_stdio(args.manager, log_level=args.log_level, credentials=credentials)
        )
        return 0
    host, port = args.http
    print(
        f"cwm mcp: streamable HTTP on http://{host}:{port}/mcp, manager {args.manager}",
        file=sys.stderr,
        flush=True,
    )
    anyio.run(
        lambda: serve_http(
            args.manager, host, port, log_level=args.log_level, credentials=credentials
        )
    )
    return 0


def add_parser(sub: Subparsers) -> None:
    mcp = sub.add_parser(
        "mcp",
        help="serve the window tools to MCP clients (stdio, or --http)",
        description="Serve cwm's window tools over MCP: stdio by default (for Claude Code and "
        "other clients that launch servers), or streamable HTTP with --http.",
    )
    mcp.add_argument(
        "--manager",
        default=os.environ.get("CWM_MANAGER", DEFAULT_TARGET),
        help="manager address HOST:PORT (env CWM_MANAGER)",
    )
    mcp.add_argument(
        "--http",
        type=_host_port,
        metavar="HOST:PORT",
        help="serve streamable HTTP at http://HOST:PORT/mcp instead of stdio "
        "(no authentication: keep it on loopback)",
    )
    add_auth_options(mcp)
    mcp.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=LOG_LEVELS,
        help="log level on stderr (default WARNING)",
    )
    mcp.set_defaults(handler=cmd_mcp, needs_client=False)
