"""`cwm fsck` (placeholder until the checker lands)."""

from __future__ import annotations

from cwm_server.cli.options import Subparsers


def add_parser(sub: Subparsers) -> None:
    del sub
