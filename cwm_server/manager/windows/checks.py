"""Checks and conversions for a window's descriptive fields (tags, description, TTL)."""

from __future__ import annotations

import time
from collections.abc import Mapping

from google.protobuf.timestamp_pb2 import Timestamp

from cwm_client.errors import InvalidArgument

MAX_TAGS = 64
MAX_TAG_CHARS = 256
MAX_DESCRIPTION_CHARS = 4096
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600


def check_labels(tags: Mapping[str, str], description: str) -> None:
    if len(tags) > MAX_TAGS:
        raise InvalidArgument(f"at most {MAX_TAGS} tags, got {len(tags)}", field="tags")
    for key, value in tags.items():
        if not key or len(key) > MAX_TAG_CHARS or len(value) > MAX_TAG_CHARS:
            raise InvalidArgument(
                f"tag {key[:40]!r}: keys must be 1-{MAX_TAG_CHARS} characters and values at "
                f"most {MAX_TAG_CHARS}",
                field="tags",
            )
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise InvalidArgument(
            f"description has {len(description)} characters; the limit is {MAX_DESCRIPTION_CHARS}",
            field="description",
        )


def now_timestamp() -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(time.time_ns())
    return stamp


def expiry_from_ttl(ttl_seconds: int) -> Timestamp | None:
    if ttl_seconds == 0:
        return None
    if ttl_seconds > MAX_TTL_SECONDS:
        raise InvalidArgument(
            f"ttl_seconds {ttl_seconds} exceeds {MAX_TTL_SECONDS} (10 years); use 0 for no expiry",
            field="ttl_seconds",
        )
    stamp = Timestamp()
    stamp.FromNanoseconds(time.time_ns() + ttl_seconds * 1_000_000_000)
    return stamp
