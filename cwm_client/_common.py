"""Where the names of the former shared module of the window clients live now, for code
(tests among it) that still imports them from here. Import them from their modules instead:

- channel defaults and credentials: `cwm_client.channels`;
- freeze streams: `cwm_client.windows.freeze_stream`;
- thaw streams: `cwm_client.windows.thaw_decoder`;
- parallel transfers: `cwm_client.windows.parallel`, `cwm_client.windows.progress`;
- catalog requests: `cwm_client.windows.catalog_requests`.

This module can go once nothing imports it.
"""

from cwm_client.channels import (
    AUTHORIZATION_KEY,
    CHANNEL_OPTIONS,
    DEFAULT_TARGET,
    EXTRA_CHANNEL_OPTIONS,
    MAX_MESSAGE_BYTES,
    Credentials,
    resolve_credentials,
)
from cwm_client.thawed import ThawedChunk
from cwm_client.windows.catalog_requests import list_request
from cwm_client.windows.freeze_stream import FreezeResult, build_header, freeze_requests
from cwm_client.windows.parallel import (
    BYTES_PER_STREAM,
    CORES_PER_STREAM,
    MAX_AUTO_STREAMS,
    PARALLEL_MIN_BYTES,
    StripedThaw,
    auto_streams,
    new_upload_id,
    stage_header,
)
from cwm_client.windows.progress import Progress, ProgressSum
from cwm_client.windows.thaw_decoder import ThawDecoder, expected_chunks

__all__ = [
    "AUTHORIZATION_KEY",
    "BYTES_PER_STREAM",
    "CHANNEL_OPTIONS",
    "CORES_PER_STREAM",
    "DEFAULT_TARGET",
    "EXTRA_CHANNEL_OPTIONS",
    "MAX_AUTO_STREAMS",
    "MAX_MESSAGE_BYTES",
    "PARALLEL_MIN_BYTES",
    "Credentials",
    "FreezeResult",
    "Progress",
    "ProgressSum",
    "StripedThaw",
    "ThawDecoder",
    "ThawedChunk",
    "auto_streams",
    "build_header",
    "expected_chunks",
    "freeze_requests",
    "list_request",
    "new_upload_id",
    "resolve_credentials",
    "stage_header",
]
