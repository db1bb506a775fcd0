"""Reading the manager's own TOML files (quotas, keys) with errors that name the file."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any


def read_toml(path: Path, what: str, error: type[Exception]) -> dict[str, Any]:
    """The parsed file; `error` ("<what> <path>: why") if it cannot be read or parsed, so
    `cwm serve` stops with a line a person can act on instead of a traceback."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise error(f"{what} {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{what} {path}: not valid TOML ({exc})") from None
