"""Building request messages from a caller's arguments, with a typed error for a value a
field cannot hold.

Protobuf refuses a number out of its field's range (a negative `ttl_seconds`, a
`chunk_tokens` of 2**32, a token id of -1) or of the wrong type with a bare `ValueError`
or `TypeError` that names neither the field nor the range; `build` turns that into
INVALID_ARGUMENT naming the field and what it takes.
"""

from __future__ import annotations

from typing import Any, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from cwm_client.errors import InvalidArgument

M = TypeVar("M", bound=Message)

_RANGES = {
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
}


def build(cls: type[M], **fields: Any) -> M:
    """`cls(**fields)`, or InvalidArgument naming the first field whose value it refuses."""
    try:
        return cls(**fields)
    except (ValueError, TypeError):
        pass
    for name, value in fields.items():
        try:
            cls(**{name: value})
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(_why(cls, name, exc), field=name) from None
    return cls(**fields)  # refused only together: let protobuf say why


def _why(cls: type[Message], name: str, exc: Exception) -> str:
    field = cls.DESCRIPTOR.fields_by_name.get(name)
    bounds = _RANGES.get(field.type) if field is not None else None
    if bounds is None:
        return f"{name}: {exc}"
    low, high = bounds
    each = " each" if hasattr(getattr(cls(), name), "extend") else ""  # a repeated field
    return f"{name} must{each} be a whole number from {low} to {high} ({exc})"
