"""The checks of setting values: each parses an environment string (and re-checks a file
value) into the value, or raises ValueError saying what was expected."""

from __future__ import annotations

import re

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


def host_port_or_empty(value: str) -> str:
    return value if value == "" else host_port(value)


def bulk_listen(value: str) -> str:
    """HOST:PORT of the bulk TCP port, or "auto" (next to the gRPC port) or "off"."""
    return value if value in ("auto", "off") else host_port(value)


def redis_urls(value: str) -> str:
    if value:
        from cwm_server.manager.tiers.redis_link import parse_urls

        parse_urls(value)
    return value


def redis_policy(value: str) -> str:
    if value not in ("write-through", "redis-only"):
        raise ValueError(f"expected write-through or redis-only, got {value!r}")
    return value


def redis_prefix(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
        raise ValueError(f"expected 1 to 64 characters of [A-Za-z0-9._-], got {value!r}")
    return value


def log_level(value: str) -> str:
    upper = value.upper()
    if upper not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return upper


def non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"expected a number >= 0, got {value!r}")
    return number


def positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError(f"expected a number > 0, got {value!r}")
    return number


def non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise ValueError(f"expected a number >= 0, got {value!r}")
    return number


def positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError(f"expected a number > 0, got {value!r}")
    return number
