"""The client commands' settings (``[client]``): the manager address and credentials, read
when a command needs them; a broken config file is reported on stderr and skipped there
(`cwm config show` names the problem)."""

from __future__ import annotations

import os
import sys

from cwm_client.channels import DEFAULT_TARGET
from cwm_server.settings.loading import ConfigError, load
from cwm_server.settings.table import BY_KEY


def default_manager_address() -> str:
    """The manager address for client commands when --manager is not given: $CWM_MANAGER,
    else the config file's client.manager, else 127.0.0.1:50051. A broken file is reported
    on stderr and skipped here (`cwm config show` names the problem)."""
    if "CWM_MANAGER" in os.environ:
        return os.environ["CWM_MANAGER"]
    try:
        value: str = load()["client.manager"]
    except ConfigError as exc:
        _warn_once(exc)
        return DEFAULT_TARGET
    return value


def client_setting(key: str) -> str:
    """A client.* setting for client commands: its environment variable, else the config
    file, else the default (a broken file is reported and skipped, as for --manager)."""
    setting = BY_KEY[key]
    if setting.env in os.environ:
        return os.environ[setting.env]
    try:
        value: str = load()[key]
    except ConfigError as exc:
        _warn_once(exc)
        return str(setting.default())
    return value


_warned: set[str] = set()


def _warn_once(exc: ConfigError) -> None:
    """One warning per problem per command, however many settings it reads."""
    if str(exc) not in _warned:
        _warned.add(str(exc))
        print(f"warning: ignoring the config file: {exc}", file=sys.stderr)


def manager_address(value: str) -> str:
    """argparse type of --manager: the value given, or the configured default when empty."""
    return value or default_manager_address()
