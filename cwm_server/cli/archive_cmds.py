"""`cwm export` and `cwm import` (placeholder until the archive lands)."""

from __future__ import annotations

from cwm_server.cli.options import Subparsers


def add_parsers(sub: Subparsers) -> None:
    del sub
