"""`cwm auth token`: mint a bearer token and print the auth-file entry that admits it.

The token is printed once (stdout) and never stored; the manager's auth file holds only its
SHA-256 (see docs/SECURITY.md).
"""

from __future__ import annotations

import argparse
import sys

from cwm_server.cli.options import Subparsers, argument_type
from cwm_server.cli.render import print_json
from cwm_server.manager.rpc.auth import ROLES, check_tenant, hash_token, mint_token, token_line


def cmd_token(args: argparse.Namespace) -> int:
    token = mint_token()
    line = token_line(token, args.tenant, args.role, args.name or "")
    if args.json:
        print_json(
            {
                "token": token,
                "sha256": hash_token(token),
                "tenant": args.tenant,
                "role": args.role,
                "auth_file_entry": line,
            }
        )
        return 0
    print(token)
    print(
        "\n# the token above is shown once; give it to the client ($CWM_TOKEN or --token).\n"
        "# add this entry to the manager's --auth-file, then restart the manager:\n",
        file=sys.stderr,
    )
    print(line, end="", file=sys.stderr)
    return 0


def add_parser(sub: Subparsers) -> None:
    auth = sub.add_parser("auth", help="mint tokens for an authenticated manager")
    actions = auth.add_subparsers(dest="auth_command", required=True, metavar="ACTION")
    token = actions.add_parser(
        "token",
        help="mint a bearer token and print the auth-file entry for it",
        description="Print a new random token on stdout (once) and, on stderr, the [[tokens]] "
        "entry (its SHA-256, tenant and role) to add to the manager's --auth-file.",
    )
    token.add_argument(
        "--tenant", required=True, type=argument_type(check_tenant), help="tenant the token acts as"
    )
    token.add_argument("--role", required=True, choices=ROLES, help="what the token may do")
    token.add_argument("--name", help="a label for the entry (who holds the token)")
    token.add_argument("--json", action="store_true", help="token, hash and entry as JSON")
    token.set_defaults(handler=cmd_token, needs_client=False)
