"""Blocking client for KeyedChunkService. `keyed.async_client.AsyncKeyedChunkClient` is its
twin; both send and check through `keyed.values`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grpc

from cwm_client import pb
from cwm_client.bulk.connection import bulk_transports, connect, no_bulk
from cwm_client.bulk.thaw_reader import BulkEnded
from cwm_client.chunks import DEFAULT_PART_BYTES
from cwm_client.errors import DataLoss, from_rpc_error
from cwm_client.keyed.bulk_values import KeyedGetStream
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

    def get(
        self, keys: Sequence[str], *, part_bytes: int = 0, transport: str = "auto"
    ) -> list[KeyedValue | None]:
        """The values of `keys` in order, None where a key does not exist; each verified.

        `transport` as for `WindowClient.thaw`: "auto" takes the manager's bulk channel
        where it offers one this client reaches (on the same host shared memory for values
        of 4 MiB or more, else its Unix socket; elsewhere its bulk TCP port), else gRPC;
        "shm", "unix" or "tcp" insist on one; "grpc" keeps the values on the stream."""
        wanted = bulk_transports(transport, self._owns_channel)
        found: list[KeyedValue | None] = []
        for batch in key_batches(keys):
            values = self._bulk_get(batch, part_bytes, wanted) if wanted else None
            if values is None:
                if transport != "auto" and wanted:
                    raise no_bulk(transport, "read of keyed values")
                values = self._grpc_get(batch, part_bytes)
            found += values
        return found

    def _grpc_get(self, batch: list[str], part_bytes: int) -> list[KeyedValue | None]:
        assembler = ValueAssembler(batch)
        request = pb.GetKeyedChunksRequest(keys=batch, max_part_bytes=part_bytes)
        try:
            for response in self._stub.GetKeyedChunks(
                request, timeout=self._timeout, metadata=self._metadata
            ):
                assembler.accept(response)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return assembler.finish()

    def _bulk_get(
        self, batch: list[str], part_bytes: int, wanted: Sequence[int]
    ) -> list[KeyedValue | None] | None:
        """The values over the bulk connection the manager offers (or on the stream, where
        it offers none); None when the offer could not be taken (the call was cancelled)."""
        request = pb.GetKeyedChunksRequest(
            keys=batch,
            max_part_bytes=part_bytes,
            bulk_transports=wanted,  # type: ignore[arg-type]
        )
        reading = KeyedGetStream(batch)
        call: Any = self._stub.GetKeyedChunks(
            request, timeout=self._timeout, metadata=self._metadata
        )
        try:
            for response in call:
                if reading.accept(response):
                    break
            else:
                return reading.finish_parts()
            assert reading.offer is not None
            try:
                sock = connect(reading.offer, self._target, self._credentials)
            except OSError:
                call.cancel()
                return None
            reader = reading.reader(sock)
            try:
                chunks = list(reader)
            except BulkEnded:
                for _ in call:  # the call's status says why the connection ended
                    break
                raise
            finally:
                reader.close()
            for _ in call:
                raise DataLoss("GetKeyedChunks sent a message after its bulk offer")
            return reading.values(chunks)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

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
