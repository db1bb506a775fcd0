"""Blocking client for KeyedChunkService. `keyed.async_client.AsyncKeyedChunkClient` is its
twin; both send and check through `keyed.values`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grpc

from cwm_client import pb
from cwm_client.chunks import DEFAULT_PART_BYTES
from cwm_client.errors import from_rpc_error
from cwm_client.keyed.values import (
    KeyedValue,
    ValueAssembler,
    key_batches,
    promote_request,
    put_requests,
)
from cwm_client.service_client import ServiceClient


class KeyedChunkClient(ServiceClient):
    """Blocking KeyedChunkService client; every failure raises a `cwm_client.errors` class."""

    _stub: pb.KeyedChunkServiceStub

    def _new_stub(self) -> pb.KeyedChunkServiceStub:
        return pb.KeyedChunkServiceStub(self._channel)

    def put(
        self, values: Iterable[KeyedValue], *, part_bytes: int = DEFAULT_PART_BYTES
    ) -> pb.PutKeyedChunksResponse:
        """Store `values` (overwriting existing keys); all or nothing."""
        response: pb.PutKeyedChunksResponse = self._unary(
            self._stub.PutKeyedChunks, put_requests(values, part_bytes)
        )
        return response

    def get(self, keys: Sequence[str], *, part_bytes: int = 0) -> list[KeyedValue | None]:
        """The values of `keys` in order, None where a key does not exist; each verified."""
        found: list[KeyedValue | None] = []
        for batch in key_batches(keys):
            assembler = ValueAssembler(batch)
            request = pb.GetKeyedChunksRequest(keys=batch, max_part_bytes=part_bytes)
            try:
                for response in self._stub.GetKeyedChunks(
                    request, timeout=self._timeout, metadata=self._metadata
                ):
                    assembler.accept(response)
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from None
            found += assembler.finish()
        return found

    def contains_prefix(self, keys: Sequence[str]) -> int:
        """How many of `keys`, from the first, exist."""
        response: pb.ContainsPrefixResponse = self._unary(
            self._stub.ContainsPrefix, pb.ContainsPrefixRequest(keys=keys)
        )
        return response.present_count

    def list_page(
        self, *, page_size: int = 0, page_token: str = "", key_prefix: str = ""
    ) -> tuple[list[pb.KeyedChunkInfo], str]:
        response: pb.ListKeysResponse = self._unary(
            self._stub.ListKeys,
            pb.ListKeysRequest(page_size=page_size, page_token=page_token, key_prefix=key_prefix),
        )
        return list(response.keys), response.next_page_token

    def list_keys(self, *, key_prefix: str = "", page_size: int = 0) -> Iterator[pb.KeyedChunkInfo]:
        """Every key (with `key_prefix`), page by page."""
        token = ""
        while True:
            infos, token = self.list_page(
                page_size=page_size, page_token=token, key_prefix=key_prefix
            )
            yield from infos
            if not token:
                return

    def delete(self, keys: Sequence[str]) -> pb.DeleteKeysResponse:
        response: pb.DeleteKeysResponse = self._unary(
            self._stub.DeleteKeys, pb.DeleteKeysRequest(keys=keys)
        )
        return response

    def promote(self, name: str, keys: Sequence[str], **kwargs: Any) -> pb.WindowInfo:
        """Name the values of `keys` (in token order) as window `name`; see
        `promote_request` for the arguments (fingerprint, token_ids, chunk_tokens, ...)."""
        response: pb.PromoteKeysToWindowResponse = self._unary(
            self._stub.PromoteKeysToWindow, promote_request(name, keys, **kwargs)
        )
        return response.window
