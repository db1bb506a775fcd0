"""Window name rules, shared by the SDK (fail before dialing) and the manager (never trust)."""

from __future__ import annotations

import re

from cwm_client.errors import InvalidArgument

WINDOW_NAME_PATTERN = r"[A-Za-z0-9._-]{1,128}"
_NAME_RE = re.compile(rf"\A{WINDOW_NAME_PATTERN}\Z")


def check_window_name(name: str, field: str = "name") -> str:
    """Return the name if it is valid; otherwise raise INVALID_ARGUMENT saying why.

    "." and ".." match the character class but are path tricks, so they are refused too.
    """
    if not _NAME_RE.match(name) or name in {".", ".."}:
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise InvalidArgument(
            f"{field} {shown!r} is not a valid window name: use 1-128 characters from "
            f"A-Z a-z 0-9 . _ - (not '.' or '..')",
            field=field,
            reason="INVALID_WINDOW_NAME",
        )
    return name
