"""Options every subcommand takes after its name (`cwm ls --json --manager H:P`)."""

from __future__ import annotations

import argparse
from typing import TypeAlias

from cwm_server.config import manager_address

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--manager",
        default="",  # a string default goes through `type`: resolved only when used
        type=manager_address,
        metavar="HOST:PORT",
        help="manager address (default: $CWM_MANAGER, else client.manager in the config "
        "file, else 127.0.0.1:50051)",
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")
    return common


def add_command(sub: Subparsers, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, parents=[_common()])
