"""One import point for the generated messages, enums and stubs.

Callers write `from cwm_client import pb` and `pb.WindowInfo`, instead of reaching into
`_generated` paths that change whenever the proto files are reorganised.
"""

from cwm_client._generated.cwm.v1.chunk_pb2 import Chunk, ChunkCodec, ChunkRef
from cwm_client._generated.cwm.v1.fingerprint_pb2 import KvDtype, ModelFingerprint
from cwm_client._generated.cwm.v1.window_pb2 import WindowInfo, WindowView
from cwm_client._generated.cwm.v1.window_service_pb2 import (
    CloneWindowRequest,
    CloneWindowResponse,
    DeleteWindowRequest,
    DeleteWindowResponse,
    FindMissingChunksRequest,
    FindMissingChunksResponse,
    FreezeHeader,
    FreezeRequest,
    FreezeResponse,
    GetWindowRequest,
    GetWindowResponse,
    ListWindowsRequest,
    ListWindowsResponse,
    ThawRequest,
    ThawResponse,
)
from cwm_client._generated.cwm.v1.window_service_pb2_grpc import (
    WindowServiceServicer,
    WindowServiceStub,
    add_WindowServiceServicer_to_server,
)

__all__ = [
    "Chunk",
    "ChunkCodec",
    "ChunkRef",
    "CloneWindowRequest",
    "CloneWindowResponse",
    "DeleteWindowRequest",
    "DeleteWindowResponse",
    "FindMissingChunksRequest",
    "FindMissingChunksResponse",
    "FreezeHeader",
    "FreezeRequest",
    "FreezeResponse",
    "GetWindowRequest",
    "GetWindowResponse",
    "KvDtype",
    "ListWindowsRequest",
    "ListWindowsResponse",
    "ModelFingerprint",
    "ThawRequest",
    "ThawResponse",
    "WindowInfo",
    "WindowServiceServicer",
    "WindowServiceStub",
    "WindowView",
    "add_WindowServiceServicer_to_server",
]
