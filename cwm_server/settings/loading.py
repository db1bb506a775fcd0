"""Resolving every setting from flags, `CWM_*` variables, the config file and defaults
(highest first), checking each value, into one `Effective` configuration."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cwm_server.settings.table import BY_ENV, BY_KEY, SETTINGS, Setting

CONFIG_ENV = "CWM_CONFIG"


class ConfigError(Exception):
    """A configuration value or file that cannot be used; the message says which and why."""


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "cwm" / "config.toml"


@dataclass
class Effective:
    """The resolved configuration: every value with where it came from."""

    file: Path | None
    file_searched: str
    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, Any] = field(default_factory=dict)
    """Keys the file or the environment set that no setting has (shown, then ignored)."""

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"serve": {"listen": X}} -> {"serve.listen": X}, at any depth."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_file_value(setting: Setting, value: Any, path: Path) -> Any:
    expected = setting.kind
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: {setting.key} must be a {expected.__name__}, got {value!r}")
    try:
        checked = setting.check(str(value).lower() if expected is bool else str(value))
    except ValueError as exc:
        raise ConfigError(f"{path}: {setting.key}: {exc}") from None
    return value if expected in (bool, float) else checked


def resolve_path(explicit: str | None, environ: Mapping[str, str]) -> tuple[Path | None, str]:
    """The config file to read (or None) and a phrase saying where cwm looked."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"--config {explicit}: no such file")
        return path, f"--config {explicit}"
    named = environ.get(CONFIG_ENV)
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise ConfigError(f"${CONFIG_ENV}={named}: no such file")
        return path, f"${CONFIG_ENV}"
    default = default_config_path()
    return (default if default.is_file() else None), f"looked for {default}"


def load(
    flags: Mapping[str, Any] | None = None,
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Effective:
    """Resolve every setting. `flags` maps setting keys to values given on the command line
    (None or absent: not given)."""
    env = os.environ if environ is None else environ
    path, searched = resolve_path(config_file, env)
    effective = Effective(file=path, file_searched=searched)
    file_values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as handle:
                file_values = _flatten(tomllib.load(handle))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    for key, value in file_values.items():
        if key not in BY_KEY:
            effective.ignored[key] = value
    for name, value in env.items():
        if name.startswith("CWM_") and name not in BY_ENV and name != CONFIG_ENV:
            effective.ignored[f"env {name}"] = value
    for setting in SETTINGS:
        given = (flags or {}).get(setting.key)
        if given is not None:
            value, source = given, f"flag {setting.flag}" if setting.flag else "flag"
        elif setting.env in env:
            try:
                value = setting.check(env[setting.env])
            except ValueError as exc:
                raise ConfigError(f"${setting.env}: {exc}") from None
            source = f"env {setting.env}"
        elif setting.key in file_values:
            value = _check_file_value(setting, file_values[setting.key], path or Path())
            source = "file"
        else:
            value, source = setting.default(), "default"
        effective.values[setting.key] = value
        effective.sources[setting.key] = source
    return effective
