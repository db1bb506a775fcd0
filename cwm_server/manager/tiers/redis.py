"""The Redis tier: chunk bytes in a single Redis (or Valkey) or in Redis Cluster, through the
manager's `RedisLink` (`redis_link`).

Key layout (``prefix`` defaults to ``cwm``)::

    cwm:chunk:{<tenant>:<digest hex>}       one chunk's stored (maybe compressed) bytes
    cwm:chunkinfo:{<tenant>:<digest hex>}   its 16-byte header (`format`): magic, version,
                                            codec, word size, raw size

The hash tag is the tenant *and the digest*, so one window's chunks spread over every
master of a cluster (no hot slot for a big window), while a chunk's two keys share a slot:
they are written together by one MSET, read together by one MGET and deleted by one DEL,
atomically. Keeping the header apart means the bytes go out and come back exactly as
stored, never copied to prepend or strip a header (on a small machine such a copy costs
about as much as sending the chunk to a local Redis). Nothing here trusts what it reads:
`ChunkStore` verifies every chunk against its digest.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from cwm_server.manager.tiers.base import ChunkCorrupt, ChunkTier
from cwm_server.manager.tiers.format import (
    REDIS_MAGIC,
    StoredChunk,
    pack_header,
    unpack_header,
)
from cwm_server.manager.tiers.redis_link import RedisLink, tenant_tag


class RedisTier(ChunkTier[StoredChunk]):
    """Chunk bytes in Redis, keyed by tenant and digest (see the module's key layout)."""

    def __init__(self, link: RedisLink, prefix: str = "cwm") -> None:
        self.link = link
        self.prefix = prefix

    def key(self, tenant: str, digest: bytes) -> str:
        """The key of a chunk's bytes."""
        return f"{self.prefix}:chunk:{{{tenant_tag(tenant)}:{digest.hex()}}}"

    def info_key(self, tenant: str, digest: bytes) -> str:
        """The key of a chunk's header (same hash tag, so the same slot)."""
        return f"{self.prefix}:chunkinfo:{{{tenant_tag(tenant)}:{digest.hex()}}}"

    def _mset_args(self, tenant: str, digest: bytes, chunk: StoredChunk) -> list[Any]:
        """MSET's arguments for one chunk: its header key and header, its key and bytes."""
        header = pack_header(chunk.codec, chunk.word_size, chunk.raw_size, REDIS_MAGIC)
        return [self.info_key(tenant, digest), header, self.key(tenant, digest), chunk.data]

    @staticmethod
    def parse(header: bytes | None, data: bytes | None) -> StoredChunk | None:
        """A chunk from its two values; None if neither exists, ChunkCorrupt if they do not
        make a chunk."""
        if header is None and data is None:
            return None
        if header is None or data is None:
            raise ChunkCorrupt("a chunk's header or bytes are missing in Redis")
        try:
            codec, word_size, raw_size = unpack_header(header, REDIS_MAGIC)
        except ValueError as exc:
            raise ChunkCorrupt(str(exc)) from None
        return StoredChunk(codec=codec, word_size=word_size, raw_size=raw_size, data=data)

    def write(self, tenant: str, digest: bytes, chunk: StoredChunk) -> int:
        """Store one chunk (one MSET of its two keys); returns the bytes it occupies."""
        args = self._mset_args(tenant, digest, chunk)
        self.link.call(lambda c: c.execute_command("MSET", *args), "storing a chunk in Redis")
        return chunk.stored_size

    def write_many(self, tenant: str, chunks: Iterable[tuple[bytes, StoredChunk]]) -> int:
        """Store several (digest, chunk) in one pipelined round trip (per master, in a
        cluster); returns the bytes written."""
        commands = [(self._mset_args(tenant, digest, chunk), chunk) for digest, chunk in chunks]
        if not commands:
            return 0

        def _run(client: Any) -> None:
            pipe = client.pipeline(transaction=False)
            for args, _ in commands:
                pipe.execute_command("MSET", *args)
            pipe.execute()

        self.link.call(_run, "storing chunks in Redis")
        return sum(chunk.stored_size for _, chunk in commands)

    def read(self, tenant: str, digest: bytes) -> StoredChunk | None:
        """The stored chunk, or None if Redis does not hold it (UNAVAILABLE if Redis cannot
        be reached; ChunkCorrupt if what it holds is not a chunk)."""
        keys = [self.info_key(tenant, digest), self.key(tenant, digest)]
        header, data = self.link.call(
            lambda c: c.execute_command("MGET", *keys), "reading a chunk from Redis"
        )
        return self.parse(header, data)

    def read_many(self, tenant: str, digests: Sequence[bytes]) -> list[StoredChunk | None]:
        """`read` of several chunks in one pipelined round trip."""
        keys = [[self.info_key(tenant, d), self.key(tenant, d)] for d in digests]

        def _run(client: Any) -> list[list[bytes | None]]:
            pipe = client.pipeline(transaction=False)
            for pair in keys:
                pipe.execute_command("MGET", *pair)
            return list(pipe.execute())

        values = self.link.call(_run, "reading chunks from Redis")
        return [self.parse(header, data) for header, data in values]

    def contains(self, tenant: str, digests: Sequence[bytes]) -> set[bytes]:
        """Which of `digests` Redis holds (one pipelined EXISTS per chunk)."""
        if not digests:
            return set()
        keys = [(self.info_key(tenant, d), self.key(tenant, d)) for d in digests]

        def _run(client: Any) -> list[int]:
            pipe = client.pipeline(transaction=False)
            for pair in keys:
                pipe.execute_command("EXISTS", *pair)
            return list(pipe.execute())

        found = self.link.call(_run, "looking chunks up in Redis")
        return {d for d, n in zip(digests, found, strict=True) if n == 2}

    def remove(self, tenant: str, digests: Sequence[bytes]) -> None:
        if not digests:
            return
        keys = [(self.info_key(tenant, d), self.key(tenant, d)) for d in digests]

        def _run(client: Any) -> None:
            pipe = client.pipeline(transaction=False)
            for pair in keys:
                pipe.execute_command("DEL", *pair)
            pipe.execute()

        self.link.call(_run, "removing chunks from Redis")

    def scan(self) -> Iterator[tuple[str, bytes]]:
        """(tenant tag, digest) of every chunk header under this prefix (SCAN, on every
        master of a cluster): the orphan sweep's census. Slow on a big keyspace."""
        pattern = _glob_escape(f"{self.prefix}:chunkinfo:{{") + "*"

        def _scan(client: Any) -> list[bytes]:
            return list(client.scan_iter(match=pattern, count=1000))

        for key in self.link.call(_scan, "listing chunks in Redis"):
            text = key.decode() if isinstance(key, bytes) else str(key)
            inner = text[text.find("{") + 1 : text.rfind("}")]
            tag, _, hexd = inner.rpartition(":")
            try:
                digest = bytes.fromhex(hexd)
            except ValueError:
                continue
            yield tag, digest


def _glob_escape(text: str) -> str:
    """`text` as a literal in a SCAN MATCH pattern."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)
