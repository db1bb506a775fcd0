"""Clients of WindowService: freeze, thaw and the window catalog, blocking and asyncio.

The two clients (`sync_client`, `async_client`) differ only in how they wait; what they
send and check is built once, in `freeze_stream` (freeze requests and plans),
`thaw_decoder` and `thaw_stream_core` (reading thaw streams), `parallel` (splitting a
transfer over streams) and `catalog_requests`.
"""

from cwm_client.thawed import ThawedChunk
from cwm_client.windows.async_client import AsyncWindowClient
from cwm_client.windows.async_thaw_stream import AsyncThawStream
from cwm_client.windows.freeze_stream import FreezeResult
from cwm_client.windows.sync_client import WindowClient
from cwm_client.windows.thaw_stream import ThawStream

__all__ = [
    "AsyncThawStream",
    "AsyncWindowClient",
    "FreezeResult",
    "ThawStream",
    "ThawedChunk",
    "WindowClient",
]
