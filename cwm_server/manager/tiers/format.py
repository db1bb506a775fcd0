"""How a chunk is kept by a tier below memory: its bytes as stored and a 16-byte header.

The header (magic, version, codec, word size, raw size) is the same for every tier; only
its magic differs, naming the tier, so a Redis value is never mistaken for a chunk file.
It lets a stored chunk be decoded, and fsck check it, without the catalog. A codec with its
high bit set (`sealing.SEALED`) marks bytes sealed in an encryption envelope; the tiers keep
them like any other bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

DISK_MAGIC = b"CWMC"
REDIS_MAGIC = b"CWMR"
VERSION = 1
_HEADER = struct.Struct("<4sBBHQ")
HEADER_SIZE = _HEADER.size


@dataclass(frozen=True)
class StoredChunk:
    """One chunk as a tier keeps it: `data` is encoded with `codec` (sealed if the codec
    says so) and decodes to `raw_size` bytes of `word_size`-byte words."""

    codec: int
    word_size: int
    raw_size: int
    data: bytes | memoryview

    @property
    def stored_size(self) -> int:
        """The bytes the chunk occupies in its tier, header included."""
        return HEADER_SIZE + len(self.data)


def pack_header(codec: int, word_size: int, raw_size: int, magic: bytes = DISK_MAGIC) -> bytes:
    """The header a tier stores before a chunk's bytes; `magic` names the tier."""
    return _HEADER.pack(magic, VERSION, codec, word_size, raw_size)


def unpack_header(header: bytes, magic: bytes = DISK_MAGIC) -> tuple[int, int, int]:
    """(codec, word size, raw size) of a header; ValueError if it is not one of `magic`."""
    if len(header) != HEADER_SIZE:
        raise ValueError("truncated header")
    found, version, codec, word_size, raw_size = _HEADER.unpack(header)
    if found != magic or version != VERSION:
        raise ValueError("bad magic or version")
    return codec, word_size, raw_size
