"""Waiting on the queues between a thaw's receiving threads and its consumer: poll, so a
closed thaw wakes every waiter (the blocking thaw stream and the bulk reader both do)."""

from __future__ import annotations

import queue
import threading

from cwm_client.errors import Cancelled

POLL_S = 0.1
"""How often a waiting reader or consumer looks whether the thaw was closed."""


def take_unless_closed(shared: queue.Queue[object], closed: threading.Event) -> object:
    """The next item a blocking thaw's receiving thread queued (CANCELLED once closed)."""
    while True:
        try:
            return shared.get(timeout=POLL_S)
        except queue.Empty:
            if closed.is_set():
                raise Cancelled("the thaw was closed while a chunk was awaited") from None


def put_unless_closed(shared: queue.Queue[object], item: object, closed: threading.Event) -> bool:
    """Queue `item` for the consumer, waiting while the queue is full; False once closed."""
    while not closed.is_set():
        try:
            shared.put(item, timeout=POLL_S)
            return True
        except queue.Full:
            continue
    return False
