"""The base of every client: owning its channel (and the extra channels of a parallel
transfer), closing them, and turning a failed call into its `cwm_client.errors` class.

`ServiceClient` blocks and `AsyncServiceClient` is its asyncio twin; both take the same
target, credential and timeout options from `ClientCore`, so a client of one service differs
from another only in its stub and its methods, and a blocking client from its asyncio twin
only in how it waits.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import grpc
import grpc.aio

from cwm_client.channels import (
    CHANNEL_OPTIONS,
    DEFAULT_TARGET,
    EXTRA_CHANNEL_OPTIONS,
    Credentials,
    resolve_credentials,
)
from cwm_client.errors import from_rpc_error

ChannelT = TypeVar("ChannelT", grpc.Channel, grpc.aio.Channel)


class ClientCore(Generic[ChannelT]):
    """What the blocking and asyncio clients hold alike: credentials, the channel, the
    call options and the extra channels of parallel transfers."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        channel: ChannelT | None = None,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        token: str | None = None,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        """`token` is sent as ``authorization: Bearer`` on every call; `root_certificates`
        (the CA of the manager's certificate), `certificate_chain` and `private_key` (a
        client certificate, for mutual TLS) make the channel TLS. `credentials` bundles
        the same (the keyword options win)."""
        self._credentials = resolve_credentials(
            credentials, token, root_certificates, certificate_chain, private_key
        )
        self._owns_channel = channel is None
        self._target = target
        self._channel: ChannelT = channel or self._open_channel(CHANNEL_OPTIONS)
        self._timeout = timeout
        self._metadata = (*self._credentials.metadata(), *metadata)
        self._stub = self._new_stub()
        self._extra_channels: list[ChannelT] = []
        self._lock = threading.Lock()

    def _open_channel(self, options: Sequence[tuple[str, Any]]) -> ChannelT:
        raise NotImplementedError

    def _new_stub(self) -> Any:
        raise NotImplementedError

    def _channels(self, count: int) -> list[ChannelT]:
        """`count` channels for the streams of one parallel transfer: this client's, then
        extra ones to the same target, each its own TCP connection, made on first use and
        kept until close(). A client built on a caller's channel uses only that one."""
        if not self._owns_channel:
            return [self._channel] * count
        with self._lock:
            while len(self._extra_channels) < count - 1:
                self._extra_channels.append(self._open_channel(EXTRA_CHANNEL_OPTIONS))
            channels = [self._channel]
            channels.extend(self._extra_channels[: count - 1])
            return channels


class ServiceClient(ClientCore[grpc.Channel]):
    """Base of the blocking clients."""

    def _open_channel(self, options: Sequence[tuple[str, Any]]) -> grpc.Channel:
        return self._credentials.channel(self._target, options)

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()
            for extra in self._extra_channels:
                extra.close()
            self._extra_channels = []

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _unary(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None


class AsyncServiceClient(ClientCore[grpc.aio.Channel]):
    """Base of the asyncio clients."""

    def _open_channel(self, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
        return self._credentials.aio_channel(self._target, options)

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close(None)
            for extra in self._extra_channels:
                await extra.close(None)
            self._extra_channels = []

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _unary(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
