"""Options every subcommand takes after its name (`cwm ls --json --manager H:P`).

Client commands also take how to authenticate: `--token` (else `$CWM_TOKEN`, else
client.token in the config file) and `--tls-ca/--tls-cert/--tls-key` (TLS and a client
certificate; else `$CWM_TLS_CA`, `$CWM_TLS_CLIENT_CERT`, `$CWM_TLS_CLIENT_KEY`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TypeAlias, TypeVar

from cwm_client import Credentials
from cwm_client.ttl import parse_ttl
from cwm_server.settings.client import client_setting, manager_address

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
T = TypeVar("T")


def argument_type(check: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse `type` from a check that raises ValueError, so that argparse prints the
    check's own message."""

    def parse(value: str) -> T:
        try:
            return check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _ttl_seconds(value: str) -> int:
    return parse_ttl(value).seconds


ttl_seconds = argument_type(_ttl_seconds)
"""argparse type of --ttl: a TTL class (5m, 1h, 24h, 7d, never, pinned), <n>s/m/h/d or
seconds -> seconds (0: no expiry)."""


def add_ttl_option(parser: argparse.ArgumentParser, help: str) -> None:
    """--ttl TTL, parsed by `ttl_seconds` (None when not given)."""
    parser.add_argument("--ttl", type=ttl_seconds, metavar="TTL", help=help)


def _common(client: bool) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    if client:
        add_global_options(common)
    else:
        common.add_argument("--json", action="store_true", help="machine-readable output")
    return common


def add_global_options(parser: argparse.ArgumentParser) -> None:
    """--manager, --json and the authentication options, on the top-level parser and on
    every client command. None has a default in the parse: `apply_global_defaults` fills in
    those given nowhere, so a command's copy never hides one given before its name
    (`cwm --manager H:P ls`)."""
    parser.add_argument(
        "--manager",
        default=argparse.SUPPRESS,
        type=manager_address,
        metavar="HOST:PORT",
        help="manager address (default: $CWM_MANAGER, else client.manager in the config "
        "file, else 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    add_auth_options(parser, default=argparse.SUPPRESS)


def apply_global_defaults(args: argparse.Namespace) -> None:
    """The defaults of the options `add_global_options` adds, where none was given."""
    if not hasattr(args, "manager"):
        args.manager = manager_address("")
    for name, default in (("json", False), ("token", None)):
        if not hasattr(args, name):
            setattr(args, name, default)
    for name in ("tls_ca", "tls_cert", "tls_key"):
        if not hasattr(args, name):
            setattr(args, name, None)


def add_auth_options(parser: argparse.ArgumentParser, default: object = None) -> None:
    """--token and --tls-ca/--tls-cert/--tls-key (None: from the environment or file)."""
    parser.add_argument(
        "--token",
        default=default,
        help="bearer token (default: $CWM_TOKEN, else client.token in the config file)",
    )
    parser.add_argument(
        "--tls-ca",
        default=default,
        metavar="PEM",
        help="CA of the manager's certificate; given, the connection uses TLS ($CWM_TLS_CA)",
    )
    parser.add_argument(
        "--tls-cert",
        default=default,
        metavar="PEM",
        help="client certificate for mutual TLS ($CWM_TLS_CLIENT_CERT)",
    )
    parser.add_argument(
        "--tls-key",
        default=default,
        metavar="PEM",
        help="key of the client certificate ($CWM_TLS_CLIENT_KEY)",
    )


def client_credentials(args: argparse.Namespace) -> Credentials:
    """The credentials a client command connects with (flags, else env, else file)."""

    def pick(dest: str, key: str) -> str:
        given = getattr(args, dest, None)
        return str(given) if given is not None else client_setting(key)

    try:
        return Credentials.from_files(
            token=pick("token", "client.token"),
            ca_file=pick("tls_ca", "client.tls_ca"),
            cert_file=pick("tls_cert", "client.tls_client_cert"),
            key_file=pick("tls_key", "client.tls_client_key"),
        )
    except OSError as exc:
        print(f"error: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        raise SystemExit(2) from None


def add_command(
    sub: Subparsers, name: str, help: str, *, client: bool = True
) -> argparse.ArgumentParser:
    """A subcommand with the common options; `client=False` (the manager itself) leaves the
    client's authentication options out."""
    return sub.add_parser(name, help=help, parents=[_common(client)])


def add_transport_option(parser: argparse.ArgumentParser) -> None:
    """`--transport`: what carries a transfer's chunk bytes (the SDK's `transport=`)."""
    parser.add_argument(
        "--transport",
        choices=("auto", "grpc", "shm", "unix", "tcp"),
        default="auto",
        help="auto (default): the manager's bulk channel where it can be reached (on this "
        "host shared memory for large chunks, else its Unix socket; elsewhere its bulk TCP "
        "port), else gRPC; or force one",
    )
