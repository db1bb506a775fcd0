"""What the keyed clients send and check, built once for the blocking and asyncio twins:
the values, their PutKeyedChunks parts, the reassembly and BLAKE3 check of a
GetKeyedChunks stream, and the promote request.

A value read is checked against its digest before it is returned: a value that does not
match raises `DataLoss`, it is never handed over.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from cwm_client import pb
from cwm_client.chunks import DEFAULT_PART_BYTES, digest
from cwm_client.errors import DataLoss

MAX_KEY_BYTES = 1024
"""Longest key the manager accepts, in UTF-8 bytes."""
MAX_KEYS_PER_GET = 1024
"""Most keys one GetKeyedChunks call may name; `get` splits longer lists."""


@dataclass(frozen=True)
class KeyedValue:
    """A value stored (or to store) under a key."""

    key: str
    data: bytes | memoryview
    """The value's bytes; read over shared memory, a read-only view of the sealed region
    they came in (as `ThawedChunk.data`)."""
    metadata: bytes = b""
    """The caller's own description of the value (opaque to cwm; at most 64 KiB)."""
    word_size: int = 0
    """Element size in bytes (1, 2 or 4), a hint for compression on disk; 0 means 1."""
    digest: bytes = field(default=b"")
    """BLAKE3-256 of data; computed when empty."""

    def with_digest(self) -> KeyedValue:
        if self.digest:
            return self
        return KeyedValue(self.key, self.data, self.metadata, self.word_size, digest(self.data))


def put_requests(
    values: Iterable[KeyedValue], part_bytes: int = DEFAULT_PART_BYTES
) -> Iterator[pb.PutKeyedChunksRequest]:
    """The PutKeyedChunks stream for `values`: each value as parts of at most `part_bytes`."""
    for value in values:
        value = value.with_digest()
        view = memoryview(value.data)
        size = len(view)
        for offset in range(0, max(size, 1), part_bytes):
            part = pb.KeyedChunkPart(
                key=value.key, data_offset=offset, data=bytes(view[offset : offset + part_bytes])
            )
            if offset == 0:
                part.digest = value.digest
                part.raw_size = size
                part.metadata = value.metadata
                part.word_size = value.word_size
            yield pb.PutKeyedChunksRequest(part=part)


class ValueAssembler:
    """Puts the parts of a GetKeyedChunks stream back together and verifies each value."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = list(keys)
        self.values: list[KeyedValue | None] = []
        self._head: pb.KeyedChunkPart | None = None
        self._buffer = bytearray()

    def accept(self, response: pb.GetKeyedChunksResponse) -> None:
        part = response.part
        if self._head is None:
            position = len(self.values)
            if position >= len(self._keys) or part.key != self._keys[position]:
                raise DataLoss(f"GetKeyedChunks answered key {part.key[:80]!r} out of order")
            if not response.found:
                self.values.append(None)
                return
            if part.data_offset != 0:
                raise DataLoss(f"value of key {part.key[:80]!r} did not start at offset 0")
            self._head = part
            self._buffer = bytearray()
        elif part.key != self._head.key or part.data_offset != len(self._buffer):
            raise DataLoss(f"value of key {self._head.key[:80]!r}: parts out of order")
        self._buffer += part.data
        head = self._head
        if len(self._buffer) > head.raw_size:
            raise DataLoss(f"value of key {head.key[:80]!r} is longer than its raw_size")
        if len(self._buffer) == head.raw_size:
            data = bytes(self._buffer)
            if digest(data) != head.digest:
                raise DataLoss(
                    f"value of key {head.key[:80]!r} does not match its BLAKE3 digest; refusing it"
                )
            self.values.append(
                KeyedValue(head.key, data, head.metadata, head.word_size, head.digest)
            )
            self._head = None
            self._buffer = bytearray()

    def finish(self) -> list[KeyedValue | None]:
        if self._head is not None or len(self.values) != len(self._keys):
            raise DataLoss(
                f"GetKeyedChunks ended after {len(self.values)} of {len(self._keys)} keys"
            )
        return self.values


def promote_request(
    name: str,
    keys: Sequence[str],
    *,
    fingerprint: pb.ModelFingerprint,
    token_ids: Sequence[int],
    chunk_tokens: int,
    session_id: str = "",
    cache_salt: str = "",
    tags: Mapping[str, str] | None = None,
    description: str = "",
    ttl_seconds: int = 0,
    replace: bool = False,
) -> pb.PromoteKeysToWindowRequest:
    return pb.PromoteKeysToWindowRequest(
        name=name,
        keys=keys,
        token_ids=token_ids,
        chunk_tokens=chunk_tokens,
        fingerprint=fingerprint,
        session_id=session_id,
        cache_salt=cache_salt,
        tags=dict(tags or {}),
        description=description,
        ttl_seconds=ttl_seconds,
        replace=replace,
    )


def key_batches(keys: Sequence[str], size: int = MAX_KEYS_PER_GET) -> Iterator[list[str]]:
    """`keys` in lists of at most `size`, one GetKeyedChunks call each."""
    for start in range(0, len(keys), size):
        yield list(keys[start : start + size])
