"""What `cwm config show` prints: the effective configuration with the source of every
value, as TOML (usable as a starting config file) or as JSON with env names and flags.

Values of keys that look secret (token, password, secret, key, credential) and passwords
inside URLs are printed as ``***``, except keys that name files (``*_file``, ``tls_key``,
...), whose paths are shown.
"""

from __future__ import annotations

import json
import re
from typing import Any

from cwm_server.settings.loading import Effective
from cwm_server.settings.table import BY_KEY

REDACTED = "***"
_SECRET_WORDS = ("token", "password", "passwd", "secret", "key", "credential")
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@/\s]+@")


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


def as_dict(effective: Effective) -> dict[str, Any]:
    """The effective configuration for `cwm config show --json`: every value (redacted)
    with its source, environment variable and flag."""
    return {
        "file": str(effective.file) if effective.file else None,
        "precedence": ["flag", "env", "file", "default"],
        "settings": {
            key: {
                "value": redact(key, value),
                "source": effective.sources[key],
                "env": BY_KEY[key].env,
                "flag": BY_KEY[key].flag,
            }
            for key, value in effective.values.items()
        },
        "ignored": {key: redact(key, value) for key, value in effective.ignored.items()},
    }


def to_toml(effective: Effective) -> str:
    """The effective configuration as a TOML file (usable as a starting config)."""
    lines = ["# cwm effective configuration (precedence: flags > CWM_* env > file > defaults)"]
    lines.append(
        f"# file: {effective.file if effective.file else f'none ({effective.file_searched})'}"
    )
    section = ""
    for key, value in effective.values.items():
        setting = BY_KEY[key]
        if setting.section != section:
            section = setting.section
            lines += ["", f"[{section}]"]
        shown = _toml_value(redact(key, value))
        lines.append(f"{setting.name} = {shown}  # {effective.sources[key]}")
    if effective.ignored:
        lines += ["", "# ignored (not settings of this cwm):"]
        for key, value in sorted(effective.ignored.items()):
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
