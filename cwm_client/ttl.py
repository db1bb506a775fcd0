"""TTL classes: a window's lifetime as a word instead of a number of seconds.

| class | lifetime |
|---|---|
| ``"5m"`` | 300 s (a scratch branch) |
| ``"1h"`` | 3600 s (a session's working day) |
| ``"24h"`` | 86400 s |
| ``"7d"`` | 604800 s |
| ``"none"`` / ``"never"`` / ``"0"`` | no expiry (``ttl_seconds = 0``) |
| ``"pinned"`` | no expiry, and the window is pinned where the request can say so (a Freeze) |

Any other ``<number><unit>`` works too (units ``s``, ``m``, ``h``, ``d``: ``"90s"``, ``"2h"``,
``"3d"``), and so does a bare number of seconds. An expired window is invisible at once
(NOT_FOUND) and the manager's collector deletes it within ``--ttl-interval`` seconds.

    from cwm_client.ttl import parse_ttl
    client.freeze(name, chunks, ..., **parse_ttl("1h").freeze_kwargs())
    client.clone(src, dst, ttl_seconds=parse_ttl("24h").seconds)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TTL_CLASSES: dict[str, int] = {"5m": 300, "1h": 3600, "24h": 86400, "7d": 7 * 86400}
"""The named classes and their seconds."""

NEVER = ("none", "never", "0")
PINNED = "pinned"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_TTL = re.compile(r"(\d+)([smhd]?)")


@dataclass(frozen=True)
class Ttl:
    seconds: int
    """Lifetime from commit; 0: no expiry."""
    pinned: bool = False

    def freeze_kwargs(self) -> dict[str, object]:
        """Keyword arguments of `WindowClient.freeze` for this lifetime."""
        return {"ttl_seconds": self.seconds, "pinned": self.pinned}


def parse_ttl(value: str | int) -> Ttl:
    """A TTL class, ``<n>[smhd]`` or seconds -> Ttl; ValueError says what is accepted."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"a TTL cannot be negative, got {value}")
        return Ttl(value)
    text = str(value).strip().lower()
    if text == PINNED:
        return Ttl(0, pinned=True)
    if text in NEVER:
        return Ttl(0)
    if text in TTL_CLASSES:
        return Ttl(TTL_CLASSES[text])
    match = _TTL.fullmatch(text)
    if match is None:
        raise ValueError(
            f"TTL {value!r}: use a class ({', '.join(TTL_CLASSES)}, pinned, never), "
            "<n>s/m/h/d (e.g. 90m) or a number of seconds"
        )
    return Ttl(int(match.group(1)) * _UNITS[match.group(2) or "s"])


def ttl_seconds(value: str | int) -> int:
    """Seconds of a TTL class or duration (0 for never/pinned)."""
    return parse_ttl(value).seconds


__all__ = ["NEVER", "PINNED", "TTL_CLASSES", "Ttl", "parse_ttl", "ttl_seconds"]
