"""`cwm`: one entry point for the manager and its clients.

Client commands reach the manager named by --manager (or $CWM_MANAGER, default
127.0.0.1:50051). A failed call prints `error: CODE: message` on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from collections.abc import Sequence

from cwm_client import WindowClient
from cwm_client.allocator import tune_allocator
from cwm_client.errors import CwmError, Unavailable
from cwm_server.cli import (
    agent_cmd,
    archive_cmds,
    auth_cmd,
    config_cmd,
    demo_cmd,
    fsck_cmd,
    mcp_cmd,
    serve_cmd,
    session_cmds,
    status_cmd,
    window_cmds,
)
from cwm_server.cli.options import add_global_options, apply_global_defaults, client_credentials
from cwm_server.logs import configure_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cwm", description="cwm: freeze, keep and thaw LLM context windows (KV caches)."
    )
    parser.add_argument("--version", action="version", version=f"cwm {cwm_version()}")
    add_global_options(parser)  # also before the command: cwm --manager H:P ls
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_cmd.add_parser(sub)
    window_cmds.add_parsers(sub)
    archive_cmds.add_parsers(sub)
    fsck_cmd.add_parser(sub)
    session_cmds.add_parsers(sub)
    agent_cmd.add_parser(sub)
    demo_cmd.add_parser(sub)
    mcp_cmd.add_parser(sub)
    status_cmd.add_parser(sub)
    config_cmd.add_parser(sub)
    auth_cmd.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_global_defaults(args)
    tune_allocator()  # every cwm command moves MiB-sized chunk buffers (cwm_client.allocator)
    # Human-readable warnings on stderr for client commands; services (serve, agent, mcp)
    # configure their own logging when they start.
    configure_logging("human", "WARNING")
    try:
        if args.needs_client:
            with WindowClient(args.manager, credentials=client_credentials(args)) as client:
                return int(args.handler(args, client))
        return int(args.handler(args))
    except CwmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if isinstance(exc, Unavailable) and exc.reason == "UNAVAILABLE" and args.needs_client:
            print(
                f"hint: is `cwm serve` running at {args.manager}? (--manager or $CWM_MANAGER "
                "names another)",
                file=sys.stderr,
            )
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`cwm status | head -1`): no traceback, and none from the
        # interpreter flushing stdout at exit either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def cwm_version() -> str:
    try:
        return importlib.metadata.version("cwm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


if __name__ == "__main__":
    sys.exit(main())
