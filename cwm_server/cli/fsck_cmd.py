"""`cwm fsck`: check a manager's data dir offline, and repair what can be repaired.

Exit status: 0 when the store is clean, 1 when problems were found (even if `--repair`
fixed them all: run it again to confirm), 2 when the check could not run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cwm_server.cli.archive_cmds import ProgressBar
from cwm_server.cli.options import Subparsers, add_command
from cwm_server.cli.render import count_of, print_json
from cwm_server.fsck import FsckError, FsckReport, run_fsck
from cwm_server.manager.config import default_data_dir


def _print_report(report: FsckReport) -> None:
    state = "running: in-flight files skipped" if report.manager_running else "not running"
    print(f"cwm fsck {report.data_dir} (manager {state})")
    for problem in report.problems:
        print(problem.line())
    for warning in report.warnings:
        print(f"warning: {warning.message}")
    if report.unrecoverable_windows:
        listed = ", ".join(
            f"{key.partition('/')[2] if key.startswith('default/') else key} "
            f"(chunks {', '.join(map(str, indices))})"
            for key, indices in sorted(report.unrecoverable_windows.items())
        )
        print(f"unrecoverable windows (missing or corrupt chunks; left in place): {listed}")
    if report.unrecoverable_keys:
        keys = ", ".join(
            repr(key[:80]) if tenant == "default" else f"{tenant}/{key[:80]!r}"
            for tenant, key in sorted(report.unrecoverable_keys)
        )
        print(f"unrecoverable keys (missing or corrupt values; left in place): {keys}")
    counts = (
        f"{count_of(report.windows, 'window')}, {count_of(report.chunk_rows, 'chunk row')}, "
        f"{count_of(report.chunk_files, 'chunk file')}, "
        f"{count_of(report.chunks_verified, 'chunk')} verified"
    )
    if report.in_flight_skipped:
        counts += f", {report.in_flight_skipped} in-flight files skipped"
    if report.clean:
        print(f"clean: {counts}")
        return
    summary = count_of(len(report.problems), "problem")
    if report.repair:
        summary += f", {report.repaired} repaired, {report.remaining} left"
    elif any(p.repairable for p in report.problems):
        fixable = sum(1 for p in report.problems if p.repairable)
        summary += f" ({fixable} repairable: stop the manager and run `cwm fsck --repair`)"
    print(f"{summary}: {counts}")


def cmd_fsck(args: argparse.Namespace) -> int:
    bar = ProgressBar("fsck", enabled=not args.no_progress)
    try:
        report = run_fsck(
            Path(args.data_dir), repair=args.repair, progress=bar, key_file=args.key_file
        )
    except (FsckError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    if args.json:
        print_json(report.as_dict())
    else:
        _print_report(report)
    return 0 if report.clean else 1


def add_parser(sub: Subparsers) -> None:
    fsck = add_command(sub, "fsck", help="check a manager's data dir (offline; safe while it runs)")
    fsck.add_argument("--data-dir", default=str(default_data_dir()), help="the manager's data dir")
    fsck.add_argument(
        "--repair",
        action="store_true",
        help="delete orphan and temp files and fix refcounts (manager must be stopped); "
        "never deletes windows",
    )
    fsck.add_argument(
        "--key-file",
        metavar="FILE",
        help="the manager's --key-file: verify encrypted chunks too (without it they are "
        "reported as unverifiable warnings)",
    )
    fsck.add_argument("--no-progress", action="store_true", help="no progress bar")
    fsck.set_defaults(handler=cmd_fsck, needs_client=False)
