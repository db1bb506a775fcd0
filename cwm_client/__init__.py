"""cwm_client: the typed SDK for the cwm context window manager.

Generated protobuf/gRPC code lives in `cwm_client._generated` (use `cwm_client.pb`);
the hand-written parts are the sync and asyncio clients of each service (`windows`,
`sessions`, `keyed`, over the bases in `service_client`), channel defaults and credentials
(`channels`), typed errors (`errors`) and chunk framing (`chunks`, `codecs`).
No torch and no server code is imported here.
"""

from cwm_client import pb
from cwm_client.allocator import tune_allocator
from cwm_client.channels import Credentials
from cwm_client.chunks import (
    ChunkPayload,
    InMemoryChunk,
    array_from_chunk,
    chunks_from_array,
    chunks_from_bytes,
    digest,
)
from cwm_client.keyed import AsyncKeyedChunkClient, KeyedChunkClient, KeyedValue
from cwm_client.sessions import AsyncSessionClient, SessionClient
from cwm_client.windows import (
    AsyncThawStream,
    AsyncWindowClient,
    FreezeResult,
    ThawedChunk,
    ThawStream,
    WindowClient,
)

__all__ = [
    "AsyncKeyedChunkClient",
    "AsyncSessionClient",
    "AsyncThawStream",
    "AsyncWindowClient",
    "ChunkPayload",
    "Credentials",
    "FreezeResult",
    "InMemoryChunk",
    "KeyedChunkClient",
    "KeyedValue",
    "SessionClient",
    "ThawStream",
    "ThawedChunk",
    "WindowClient",
    "array_from_chunk",
    "chunks_from_array",
    "chunks_from_bytes",
    "digest",
    "pb",
    "tune_allocator",
]
