"""cwm's configuration: one TOML file, `CWM_*` environment variables, and flags.

Precedence, highest first: **flags > environment > file > defaults**. Each setting has one
key in the file (``[section] name``), one environment variable (``CWM_`` + the name in
upper case, without the section: ``serve.data_dir`` is ``CWM_DATA_DIR``) and, for most, a
flag. The file is the one named by ``--config FILE``, else by ``$CWM_CONFIG``, else
``$XDG_CONFIG_HOME/cwm/config.toml`` (``~/.config/cwm/config.toml``) if it exists.

Unknown keys in the file are reported and ignored (a file written for a newer cwm still
works); a value of the wrong type is an error naming the file, the key and what was
expected. ``cwm config show`` prints the effective configuration with the source of every
value; values of keys that look secret (token, password, secret, key, credential) and
passwords inside URLs are printed as ``***``, except keys that name files (``*_file``,
``tls_key``, ...), whose paths are shown.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cwm_client.channels import DEFAULT_TARGET
from cwm_server.manager.config import ManagerConfig, MiB, default_data_dir

CONFIG_ENV = "CWM_CONFIG"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
REDACTED = "***"
_SECRET_WORDS = ("token", "password", "passwd", "secret", "key", "credential")
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@/\s]+@")


class ConfigError(Exception):
    """A configuration value or file that cannot be used; the message says which and why."""


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "cwm" / "config.toml"


def _parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


def _host_port_or_empty(value: str) -> str:
    return value if value == "" else _host_port(value)


def _redis_urls(value: str) -> str:
    if value:
        from cwm_server.manager.tiers.redis import parse_urls

        parse_urls(value)
    return value


def _redis_policy(value: str) -> str:
    if value not in ("write-through", "redis-only"):
        raise ValueError(f"expected write-through or redis-only, got {value!r}")
    return value


def _redis_prefix(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
        raise ValueError(f"expected 1 to 64 characters of [A-Za-z0-9._-], got {value!r}")
    return value


def _log_level(value: str) -> str:
    upper = value.upper()
    if upper not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return upper


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"expected a number >= 0, got {value!r}")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError(f"expected a number > 0, got {value!r}")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError(f"expected a number > 0, got {value!r}")
    return number


@dataclass(frozen=True)
class Setting:
    key: str
    """``section.name`` in the file."""
    kind: type
    """The TOML type the file must use: str, int, float or bool."""
    default: Callable[[], Any]
    help: str
    flag: str = ""
    """The flag of the command that uses it, for the docs and `cwm config show`."""
    check: Callable[[str], Any] = str
    """Parses an environment string (and re-checks file values) into the value."""

    @property
    def section(self) -> str:
        return self.key.partition(".")[0]

    @property
    def name(self) -> str:
        return self.key.partition(".")[2]

    @property
    def env(self) -> str:
        return "CWM_" + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "client.manager",
        str,
        lambda: DEFAULT_TARGET,
        "manager address for client commands (cwm ls, freeze, status, ...)",
        "--manager",
        _host_port,
    ),
    Setting(
        "client.token",
        str,
        lambda: "",
        "bearer token client commands, agents and the MCP bridge send (`cwm auth token`)",
        "--token",
    ),
    Setting(
        "client.tls_ca",
        str,
        lambda: "",
        "PEM CA bundle of the manager's TLS certificate; set: client commands use TLS",
        "--tls-ca",
    ),
    Setting(
        "client.tls_client_cert",
        str,
        lambda: "",
        "PEM client certificate for a manager that requires one (mutual TLS)",
        "--tls-cert",
    ),
    Setting(
        "client.tls_client_key",
        str,
        lambda: "",
        "PEM key of the client certificate",
        "--tls-key",
    ),
    Setting(
        "serve.data_dir",
        str,
        lambda: str(default_data_dir()),
        "where the manager keeps windows (catalog and chunk files)",
        "--data-dir",
    ),
    Setting(
        "serve.listen",
        str,
        lambda: "127.0.0.1:50051",
        "gRPC address HOST:PORT (port 0: any free port)",
        "--listen",
        _host_port,
    ),
    Setting(
        "serve.metrics",
        str,
        lambda: "",
        "Prometheus endpoint HOST:PORT serving /metrics; empty: none",
        "--metrics",
        _host_port_or_empty,
    ),
    Setting(
        "serve.memory_cache_mib",
        int,
        lambda: 256,
        "byte cap of the hot in-memory tier, MiB (0 disables it)",
        "--memory-cache-mib",
        _non_negative_int,
    ),
    Setting(
        "serve.stream_window_chunks",
        int,
        lambda: 4,
        "chunks of one stream held in memory (freeze staging, thaw read-ahead)",
        "--stream-window-chunks",
        _positive_int,
    ),
    Setting(
        "serve.max_chunk_mib",
        int,
        lambda: 64,
        "largest chunk accepted, MiB",
        "--max-chunk-mib",
        _positive_int,
    ),
    Setting(
        "serve.compress",
        bool,
        lambda: True,
        "store chunks byte-plane+zstd compressed when that saves >= 10%",
        "--no-compress",
        _parse_bool,
    ),
    Setting(
        "serve.fsync",
        bool,
        lambda: True,
        "fsync chunk files before a window commits (false: faster, not crash-safe)",
        "--no-fsync",
        _parse_bool,
    ),
    Setting(
        "serve.io_threads",
        int,
        lambda: 4,
        "threads for disk I/O and digest checks",
        "--io-threads",
        _positive_int,
    ),
    Setting(
        "serve.health_interval_seconds",
        float,
        lambda: 5.0,
        "seconds between health checks of the tiers and the catalog",
        "--health-interval",
        _positive_float,
    ),
    Setting(
        "serve.min_free_mib",
        int,
        lambda: 1024,
        "free space on the data dir's filesystem below which the disk tier is DEGRADED, MiB",
        "--min-free-mib",
        _non_negative_int,
    ),
    Setting(
        "serve.quota_file",
        str,
        lambda: "",
        "TOML file of per-tenant quotas (max_bytes, max_windows); empty: no quotas",
        "--quota-file",
    ),
    Setting(
        "serve.key_file",
        str,
        lambda: "",
        "TOML file of per-tenant AES-256 keys: chunks of those tenants are encrypted at rest",
        "--key-file",
    ),
    Setting(
        "serve.ttl_interval_seconds",
        float,
        lambda: 30.0,
        "seconds between sweeps of the TTL collector that deletes expired windows",
        "--ttl-interval",
        _positive_float,
    ),
    Setting(
        "serve.upload_ttl_seconds",
        float,
        lambda: 600.0,
        "seconds an upload (a parallel freeze's staged streams) may stay open without a "
        "stream before its staged chunks are collected",
        "--upload-ttl",
        _positive_float,
    ),
    Setting(
        "serve.redis_url",
        str,
        lambda: "",
        "Redis tier URL: redis://, rediss:// or unix:// (a cluster: seeds, comma-separated)",
        "--redis-url",
        _redis_urls,
    ),
    Setting(
        "serve.redis_cluster",
        bool,
        lambda: False,
        "the Redis URLs are seed nodes of a Redis Cluster",
        "--redis-cluster",
        _parse_bool,
    ),
    Setting(
        "serve.redis_catalog",
        bool,
        lambda: False,
        "keep the window catalog in Redis, shared by every manager on it (needs redis_url)",
        "--redis-catalog",
        _parse_bool,
    ),
    Setting(
        "serve.redis_policy",
        str,
        lambda: "write-through",
        "write-through (disk and Redis) or redis-only (Redis is the durable tier, no chunk files)",
        "--redis-policy",
        _redis_policy,
    ),
    Setting(
        "serve.redis_timeout_seconds",
        float,
        lambda: 0.5,
        "Redis connect/read timeout; after a failure Redis calls fail at once until it is back",
        "--redis-timeout",
        _positive_float,
    ),
    Setting(
        "serve.redis_prefix",
        str,
        lambda: "cwm",
        "first part of every Redis key (fleets sharing one Redis use different prefixes)",
        "--redis-prefix",
        _redis_prefix,
    ),
    Setting(
        "serve.log_level",
        str,
        lambda: "INFO",
        "log level of the manager's JSON log on stderr",
        "--log-level",
        _log_level,
    ),
    Setting(
        "serve.auth_file",
        str,
        lambda: "",
        "TOML/JSON file of token hashes -> tenant and role; empty: no authentication",
        "--auth-file",
    ),
    Setting(
        "serve.tls_cert",
        str,
        lambda: "",
        "PEM certificate chain of the manager; with serve.tls_key the port speaks TLS",
        "--tls-cert",
    ),
    Setting(
        "serve.tls_key",
        str,
        lambda: "",
        "PEM private key of the manager's certificate",
        "--tls-key",
    ),
    Setting(
        "serve.tls_client_ca",
        str,
        lambda: "",
        "PEM CA of client certificates; set: mutual TLS, cwm://TENANT/ROLE certs authenticate",
        "--tls-client-ca",
    ),
)
BY_KEY = {s.key: s for s in SETTINGS}
BY_ENV = {s.env: s for s in SETTINGS}
assert len(BY_ENV) == len(SETTINGS), "setting names must be unique across sections"


_PATH_KEYS = ("_file", "_path", "_dir")
"""Keys whose values name files (serve.key_file, serve.tls_key, ...): where a secret lives is
what an operator checks with `cwm config show`, not the secret itself."""
_PATH_NAMES = ("tls_key", "tls_cert", "tls_ca", "tls_client_ca")


def is_secret(key: str) -> bool:
    name = key.rpartition(".")[2].lower()
    if name.endswith(_PATH_KEYS) or name in _PATH_NAMES:
        return False
    return any(word in name for word in _SECRET_WORDS)


def redact(key: str, value: Any) -> Any:
    """What `cwm config show` prints for `key`: secrets as ***, URL passwords hidden."""
    if is_secret(key) and value not in ("", None):
        return REDACTED
    if isinstance(value, str):
        return _URL_PASSWORD.sub(rf"\g<head>{REDACTED}@", value)
    if isinstance(value, dict):
        return {k: redact(f"{key}.{k}", v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(key, v) for v in value]
    return value


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

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": str(self.file) if self.file else None,
            "precedence": ["flag", "env", "file", "default"],
            "settings": {
                key: {
                    "value": redact(key, value),
                    "source": self.sources[key],
                    "env": BY_KEY[key].env,
                    "flag": BY_KEY[key].flag,
                }
                for key, value in self.values.items()
            },
            "ignored": {key: redact(key, value) for key, value in self.ignored.items()},
        }

    def to_toml(self) -> str:
        """The effective configuration as a TOML file (usable as a starting config)."""
        lines = ["# cwm effective configuration (precedence: flags > CWM_* env > file > defaults)"]
        lines.append(f"# file: {self.file if self.file else f'none ({self.file_searched})'}")
        section = ""
        for key, value in self.values.items():
            setting = BY_KEY[key]
            if setting.section != section:
                section = setting.section
                lines += ["", f"[{section}]"]
            shown = _toml_value(redact(key, value))
            lines.append(f"{setting.name} = {shown}  # {self.sources[key]}")
        if self.ignored:
            lines += ["", "# ignored (not settings of this cwm):"]
            for key, value in sorted(self.ignored.items()):
                lines.append(f"#   {key} = {_toml_value(redact(key, value))}")
        return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


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


def manager_config(effective: Effective) -> ManagerConfig:
    return ManagerConfig(
        data_dir=Path(effective["serve.data_dir"]).expanduser(),
        listen=effective["serve.listen"],
        memory_cache_bytes=effective["serve.memory_cache_mib"] * MiB,
        stream_window_chunks=effective["serve.stream_window_chunks"],
        max_chunk_bytes=effective["serve.max_chunk_mib"] * MiB,
        compress=effective["serve.compress"],
        fsync=effective["serve.fsync"],
        io_threads=effective["serve.io_threads"],
        quota_file=_optional_path(effective["serve.quota_file"]),
        key_file=_optional_path(effective["serve.key_file"]),
        ttl_interval_s=effective["serve.ttl_interval_seconds"],
        upload_ttl_s=effective["serve.upload_ttl_seconds"],
        redis_url=effective["serve.redis_url"],
        redis_cluster=effective["serve.redis_cluster"],
        redis_catalog=effective["serve.redis_catalog"],
        redis_policy=effective["serve.redis_policy"],
        redis_timeout_s=effective["serve.redis_timeout_seconds"],
        redis_prefix=effective["serve.redis_prefix"],
    )


def _optional_path(value: str) -> Path | None:
    return Path(value).expanduser() if value else None


def default_manager_address() -> str:
    """The manager address for client commands when --manager is not given: $CWM_MANAGER,
    else the config file's client.manager, else 127.0.0.1:50051. A broken file is reported
    on stderr and skipped here (`cwm config show` names the problem)."""
    if "CWM_MANAGER" in os.environ:
        return os.environ["CWM_MANAGER"]
    try:
        value: str = load()["client.manager"]
    except ConfigError as exc:
        print(f"warning: ignoring the config file: {exc}", file=sys.stderr)
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
        print(f"warning: ignoring the config file: {exc}", file=sys.stderr)
        return str(setting.default())
    return value


def manager_address(value: str) -> str:
    """argparse type of --manager: the value given, or the configured default when empty."""
    return value or default_manager_address()
