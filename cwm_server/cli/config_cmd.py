"""`cwm config show`: the effective configuration, with the source of every value.

Secrets are redacted (see `cwm_server.settings.rendering`). The output is TOML, usable as a
starting config file; `--json` gives the same with sources, env names and flags.
"""

from __future__ import annotations

import argparse
import sys

from cwm_server.cli.options import Subparsers, add_command
from cwm_server.cli.render import print_json
from cwm_server.cli.serve_cmd import flags_of
from cwm_server.settings.loading import ConfigError, load
from cwm_server.settings.rendering import as_dict, to_toml


def cmd_config_show(args: argparse.Namespace) -> int:
    flags = flags_of(args)
    flags["client.manager"] = args.manager
    try:
        effective = load(flags, args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print_json(as_dict(effective))
    else:
        sys.stdout.write(to_toml(effective))
    return 0


def add_parser(sub: Subparsers) -> None:
    config = sub.add_parser(
        "config",
        help="show the effective configuration",
        description="cwm reads one TOML file, CWM_* environment variables and flags; "
        "flags win over the environment, which wins over the file.",
    )
    actions = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = add_command(actions, "show", help="print the effective configuration (secrets redacted)")
    show.add_argument(
        "--config",
        metavar="FILE",
        help="TOML config file (default: $CWM_CONFIG, else ~/.config/cwm/config.toml if present)",
    )
    # --manager only when given: the flag layer of client.manager.
    show.set_defaults(handler=cmd_config_show, needs_client=False, manager=None)
