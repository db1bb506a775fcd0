"""What KeyedChunkService accepts: key sizes, how many keys a call may name, and the refusal
of a key that does not exist."""

from __future__ import annotations

from collections.abc import Sequence

from cwm_client.errors import InvalidArgument, NotFound

MAX_KEY_BYTES = 1024
MAX_METADATA_BYTES = 64 << 10
MAX_PART_BYTES = 4 << 20
"""Largest part GetKeyedChunks sends, whatever max_part_bytes asks (`wire.part_size`)."""
MAX_KEYS_PER_GET = 1024
MAX_KEYS_PER_LOOKUP = 100_000
WORD_SIZES = (0, 1, 2, 4)


def check_key(key: str, field: str = "key") -> str:
    size = len(key.encode())
    if size == 0 or size > MAX_KEY_BYTES:
        raise InvalidArgument(
            f"{field} is {size} bytes; keys must be 1 to {MAX_KEY_BYTES} bytes",
            field=field,
            reason="BAD_KEY",
        )
    return key


def check_keys(keys: Sequence[str], limit: int, field: str = "keys") -> list[str]:
    if len(keys) > limit:
        raise InvalidArgument(
            f"at most {limit} keys per call, got {len(keys)}", field=field, reason="TOO_MANY_KEYS"
        )
    for position, key in enumerate(keys):
        check_key(key, f"{field}[{position}]")
    return list(keys)


def key_not_found(key: str, field: str) -> NotFound:
    return NotFound(
        f"no key {key[:80]!r}; ListKeys lists what exists",
        field=field,
        reason="KEY_NOT_FOUND",
        metadata={"key": key[:256]},
    )
