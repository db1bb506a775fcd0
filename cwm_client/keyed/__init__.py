"""Clients for KeyedChunkService: values stored under opaque keys (a KV engine's remote tier,
e.g. LMCache's), kept as verified cwm chunks, and promotable to windows.

`KeyedChunkClient` (`sync_client`) blocks; `AsyncKeyedChunkClient` (`async_client`) is its
asyncio twin. What both send and check lives once, in `values`.
"""

from cwm_client.keyed.async_client import AsyncKeyedChunkClient
from cwm_client.keyed.sync_client import KeyedChunkClient
from cwm_client.keyed.values import (
    MAX_KEY_BYTES,
    MAX_KEYS_PER_GET,
    KeyedValue,
    ValueAssembler,
    promote_request,
    put_requests,
)

__all__ = [
    "MAX_KEYS_PER_GET",
    "MAX_KEY_BYTES",
    "AsyncKeyedChunkClient",
    "KeyedChunkClient",
    "KeyedValue",
    "ValueAssembler",
    "promote_request",
    "put_requests",
]
