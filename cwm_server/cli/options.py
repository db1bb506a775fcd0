"""Options every subcommand takes after its name (`cwm ls --json --manager H:P`)."""

from __future__ import annotations

import argparse
import os
from typing import TypeAlias

from cwm_client._common import DEFAULT_TARGET

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--manager",
        default=os.environ.get("CWM_MANAGER", DEFAULT_TARGET),
        help="manager address HOST:PORT (env CWM_MANAGER)",
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")
    return common


def add_command(sub: Subparsers, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, parents=[_common()])
