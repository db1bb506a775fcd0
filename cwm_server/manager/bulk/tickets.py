"""Single-use tickets: what lets a bulk connection carry one transfer of one gRPC call.

A ticket is 32 random bytes issued to an authenticated call, bound to the caller's tenant,
the transport it was offered on and the call's own transfer (a thaw of one window's chunk
list, or the staging share of one upload's header): what it admits is handed to `deliver`,
which only that transfer holds, so the connection carries nothing else. It is valid for
`TICKET_TTL_S`. Presenting it redeems it:
a second presentation, an expired ticket or one offered on another transport finds
nothing. The book keys tickets by their SHA-256, so a lookup's timing says nothing about
the ticket's bytes; the bytes themselves are never logged.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from socket import socket

from cwm_client.bulk.frames import TICKET_BYTES

TICKET_TTL_S = 5.0
"""How long an offer waits for its connection: far longer than a connect takes, short
enough that a leaked ticket is worth little."""


@dataclass
class Ticket:
    tenant: str
    """The caller's: a connection certified as another tenant is refused."""
    transport: int
    deliver: Callable[[socket], None]
    """Hands the connection, once it presented this ticket, to the transfer (called on
    the listener's thread)."""
    expires_at: float = field(default_factory=lambda: time.monotonic() + TICKET_TTL_S)


class TicketBook:
    """The tickets issued and not yet redeemed, shared by the event loop (issuing) and the
    listener threads (redeeming)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tickets: dict[bytes, Ticket] = {}

    def issue(self, ticket: Ticket) -> bytes:
        secret = secrets.token_bytes(TICKET_BYTES)
        with self._lock:
            self._drop_expired()
            self._tickets[_key(secret)] = ticket
        return secret

    def redeem(self, secret: bytes, transports: Container[int]) -> Ticket | None:
        """The ticket `secret` stands for, removed from the book; None if there is none,
        it expired, or it was offered for a transport that is not among `transports` (the
        endpoint's)."""
        with self._lock:
            ticket = self._tickets.pop(_key(secret), None)
        if ticket is None or ticket.expires_at < time.monotonic():
            return None
        if ticket.transport not in transports:
            return None
        return ticket

    def revoke(self, secret: bytes) -> None:
        with self._lock:
            self._tickets.pop(_key(secret), None)

    def __len__(self) -> int:
        with self._lock:
            self._drop_expired()
            return len(self._tickets)

    def _drop_expired(self) -> None:
        now = time.monotonic()
        for key in [k for k, t in self._tickets.items() if t.expires_at < now]:
            del self._tickets[key]


def _key(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()
