"""`cwm`: one entry point for the manager and its clients.

Client commands reach the manager named by --manager (or $CWM_MANAGER, default
127.0.0.1:50051). A failed call prints `error: CODE: message` on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cwm_client import WindowClient
from cwm_client.allocator import tune_allocator
from cwm_client.errors import CwmError
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
from cwm_server.cli.options import client_credentials
from cwm_server.logs import configure_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cwm", description="cwm: freeze, keep and thaw LLM context windows (KV caches)."
    )
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
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
