"""A GetKeyedChunks call that listed bulk transports, read once for the blocking and asyncio
twins.

The manager answers such a call in one of two ways. Where it makes no offer, the stream
carries the values as parts, exactly as without bulk transports (`ValueAssembler` checks
them). Where it offers a connection, the stream sends a head per key (found or not; the
digest, size and metadata of each found value, no bytes), then the offer; the found
values' bytes come on the connection in request order, each frame indexed by its key's
position, and are verified against the heads' digests (`BulkThawReader`), never against
anything the connection says.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from cwm_client import pb
from cwm_client.bulk.thaw_reader import BulkThawReader
from cwm_client.chunks import DIGEST_SIZE
from cwm_client.errors import DataLoss
from cwm_client.keyed.values import KeyedValue, ValueAssembler
from cwm_client.thawed import ThawedChunk

READ_AHEAD = 2
"""Values received ahead of the one being verified."""
_VALUES = pb.WindowInfo(name="keyed values")
"""What the bulk reader names in its errors (and reads no word size from: values are raw)."""


class KeyedGetStream:
    """The messages of one such call, up to the offer (`accept`), and the values after."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = list(keys)
        self._assembler = ValueAssembler(keys)
        self._heads: list[pb.KeyedChunkPart | None] = []
        self._mode = ""
        """"parts" (no offer: the stream carries the values) or "heads", once known."""
        self.offer: pb.BulkOffer | None = None

    def accept(self, response: pb.GetKeyedChunksResponse) -> bool:
        """Take one message; True once the offer arrived (the values are on its connection)."""
        if self.offer is not None:
            raise DataLoss("GetKeyedChunks sent a message after its bulk offer")
        if response.HasField("bulk"):
            if self._mode == "parts" or len(self._heads) != len(self._keys):
                raise DataLoss("GetKeyedChunks offered a bulk connection before every key's head")
            self.offer = response.bulk
            return True
        part = response.part
        if not response.found:  # the same message in either way of answering
            if self._mode != "parts":
                self._head(part, found=False)
            if self._mode != "heads":
                self._assembler.accept(response)
            return False
        if not self._mode:
            self._mode = "parts" if part.data else "heads"
        if self._mode == "parts":
            self._assembler.accept(response)
        elif part.data:
            raise DataLoss(f"GetKeyedChunks sent bytes of key {part.key[:80]!r} with its head")
        else:
            self._head(part, found=True)
        return False

    def finish_parts(self) -> list[KeyedValue | None]:
        """The values, when the stream ended without an offer (it carried them)."""
        if self._mode == "heads":
            raise DataLoss("GetKeyedChunks sent the keys' heads but no bulk offer")
        return self._assembler.finish()

    def reader(self, sock: socket.socket) -> BulkThawReader:
        """The reader of the found values on the offer's connection `sock`."""
        assert self.offer is not None
        refs = [
            pb.ChunkRef(index=position, digest=head.digest, raw_size=head.raw_size)
            for position, head in enumerate(self._heads)
            if head is not None
        ]
        shared_memory = self.offer.transport == pb.BulkTransport.BULK_TRANSPORT_SHM
        return BulkThawReader(sock, _VALUES, refs, READ_AHEAD, shared_memory)

    def values(self, chunks: Sequence[ThawedChunk]) -> list[KeyedValue | None]:
        """Every key's value (None where it does not exist), from the verified chunks."""
        received = iter(chunks)
        out: list[KeyedValue | None] = []
        for head in self._heads:
            if head is None:
                out.append(None)
                continue
            chunk = next(received)
            out.append(KeyedValue(head.key, chunk.data, head.metadata, head.word_size, head.digest))
        return out

    def _head(self, part: pb.KeyedChunkPart, found: bool) -> None:
        position = len(self._heads)
        if position >= len(self._keys) or part.key != self._keys[position]:
            raise DataLoss(f"GetKeyedChunks answered key {part.key[:80]!r} out of order")
        if found and (len(part.digest) != DIGEST_SIZE or part.raw_size <= 0):
            raise DataLoss(f"GetKeyedChunks sent a head for key {part.key[:80]!r} without digest")
        self._heads.append(part if found else None)
