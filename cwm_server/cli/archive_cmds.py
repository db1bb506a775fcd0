"""`cwm export` and `cwm import`: one window as a portable single-file archive.

The format lives in `cwm_client.archive`; these commands add a progress bar on stderr and
the `--json` summary.
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm  # type: ignore[import-untyped]

from cwm_client import WindowClient
from cwm_client.archive import export_window, import_window
from cwm_server.cli.options import Subparsers, add_command, add_transport_option
from cwm_server.cli.render import count_of, human_bytes, print_json


class ProgressBar:
    """A tqdm byte counter on stderr fed by a (done, total) callback.

    The bar appears on a terminal only (tqdm's `disable=None`) and never with
    `--no-progress`, so scripts and logs stay clean.
    """

    def __init__(self, description: str, enabled: bool) -> None:
        self._description = description
        self._enabled = enabled
        self._bar: tqdm[None] | None = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = tqdm(
                total=total,
                desc=self._description,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                disable=None if self._enabled else True,
                leave=False,
            )
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _fail(exc: OSError) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 1


def cmd_export(args: argparse.Namespace, client: WindowClient) -> int:
    bar = ProgressBar(f"export {args.name}", enabled=not args.no_progress)
    try:
        result = export_window(
            client,
            args.name,
            args.file,
            overwrite=args.force,
            progress=bar,
            transport=args.transport,
        )
    except OSError as exc:
        return _fail(exc)
    finally:
        bar.close()
    if args.json:
        print_json(result.as_dict())
    else:
        print(
            f"exported {result.name} -> {result.file} ({count_of(result.tokens, 'token')}, "
            f"{count_of(result.chunks, 'chunk')}, {human_bytes(result.raw_bytes)} of KV, "
            f"{human_bytes(result.bytes_written)} written)"
        )
    return 0


def cmd_import(args: argparse.Namespace, client: WindowClient) -> int:
    bar = ProgressBar(f"import {args.file}", enabled=not args.no_progress)
    try:
        result = import_window(
            client,
            args.file,
            name=args.name,
            replace=args.replace,
            ttl_seconds=args.ttl,
            progress=bar,
            transport=args.transport,
        )
    except OSError as exc:
        return _fail(exc)
    finally:
        bar.close()
    if args.json:
        print_json(result.as_dict())
    else:
        print(
            f"imported {result.file} -> {result.name} ({count_of(result.tokens, 'token')}, "
            f"{count_of(result.chunks, 'chunk')}: {result.chunks_sent} sent, "
            f"{result.chunks_reused} already stored; {human_bytes(result.bytes_sent)} sent)"
        )
    return 0


def add_parsers(sub: Subparsers) -> None:
    export = add_command(sub, "export", help="write a window to a portable archive file")
    export.add_argument("name", help="window to export")
    export.add_argument("file", help="archive to write (a plain tar)")
    export.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    export.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_transport_option(export)
    export.set_defaults(handler=cmd_export, needs_client=True)

    imp = add_command(sub, "import", help="freeze a window from an archive file")
    imp.add_argument("file", help="archive written by `cwm export`")
    imp.add_argument("--name", help="import under this name instead of the archived one")
    imp.add_argument(
        "--replace", action="store_true", help="replace an existing window of that name"
    )
    imp.add_argument(
        "--ttl",
        type=int,
        metavar="SECONDS",
        help="expire after this long (0: never); default: the archived window's remaining life",
    )
    imp.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_transport_option(imp)
    imp.set_defaults(handler=cmd_import, needs_client=True)
