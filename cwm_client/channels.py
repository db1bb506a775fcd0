"""Where a client connects and how it proves who it is: the default target, the channel
options every cwm channel uses, and the credentials (bearer token, TLS, mutual TLS).

Public so that server code (the agent dialling the manager, the manager sizing its own
messages, the CLI's defaults) uses the same values as the SDK instead of copying them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from cwm_client.errors import InvalidArgument

DEFAULT_TARGET = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 16 << 20
"""Large enough for a 1 MiB part and for a WindowInfo listing ~4M token ids; the gRPC
default (4 MiB) is raised only this far."""

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

EXTRA_CHANNEL_OPTIONS: list[tuple[str, int]] = [
    *CHANNEL_OPTIONS,
    ("grpc.use_local_subchannel_pool", 1),
]
"""For the extra channels of a parallel freeze or thaw: a private subchannel pool gives each
its own TCP connection, so the streams do not share one connection's flow control and
one-thread-at-a-time processing."""

AUTHORIZATION_KEY = "authorization"
"""The metadata key that carries the bearer token."""


@dataclass(frozen=True)
class Credentials:
    """How a client proves who it is: a bearer token, TLS, or both.

    With no root certificates, client certificate or `tls=True` the channel is plaintext
    (a manager on loopback); a token is then still sent, as metadata.
    """

    token: str | None = None
    """Sent as ``authorization: Bearer <token>`` on every call."""
    root_certificates: bytes | None = None
    """PEM CA bundle that signed the manager's certificate (None with tls: system roots)."""
    certificate_chain: bytes | None = None
    """PEM client certificate, for a manager that requires one (mutual TLS)."""
    private_key: bytes | None = None
    """PEM key of the client certificate."""
    tls: bool = False
    """Use TLS even without any of the PEM options (trusting the system's roots)."""

    @classmethod
    def from_files(
        cls,
        token: str | None = None,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
    ) -> Credentials:
        """Credentials from PEM file paths (empty or None: not used)."""

        def read(path: str | Path | None) -> bytes | None:
            return Path(path).expanduser().read_bytes() if path else None

        return cls(
            token=token or None,
            root_certificates=read(ca_file),
            certificate_chain=read(cert_file),
            private_key=read(key_file),
        )

    @property
    def secure(self) -> bool:
        return self.tls or any(
            v is not None
            for v in (self.root_certificates, self.certificate_chain, self.private_key)
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AUTHORIZATION_KEY, f"Bearer {self.token}"),) if self.token else ()

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.secure:
            return None
        if (self.certificate_chain is None) != (self.private_key is None):
            raise InvalidArgument(
                "a client certificate needs both its chain and its private key",
                field="certificate_chain",
            )
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def channel(self, target: str, options: Sequence[tuple[str, Any]]) -> grpc.Channel:
        """A blocking channel to `target` with these credentials."""
        creds = self.channel_credentials()
        if creds is None:
            return grpc.insecure_channel(target, options=options)
        return grpc.secure_channel(target, creds, options=options)

    def aio_channel(self, target: str, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
        """An asyncio channel to `target` with these credentials."""
        creds = self.channel_credentials()
        if creds is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, creds, options=options)


def resolve_credentials(
    credentials: Credentials | None,
    token: str | None,
    root_certificates: bytes | None,
    certificate_chain: bytes | None,
    private_key: bytes | None,
) -> Credentials:
    """The clients' keyword options folded into one Credentials (`credentials` first)."""
    base = credentials or Credentials()
    return Credentials(
        token=token if token is not None else base.token,
        root_certificates=root_certificates or base.root_certificates,
        certificate_chain=certificate_chain or base.certificate_chain,
        private_key=private_key or base.private_key,
        tls=base.tls,
    )


__all__ = [
    "AUTHORIZATION_KEY",
    "CHANNEL_OPTIONS",
    "DEFAULT_TARGET",
    "EXTRA_CHANNEL_OPTIONS",
    "MAX_MESSAGE_BYTES",
    "Credentials",
    "resolve_credentials",
]
