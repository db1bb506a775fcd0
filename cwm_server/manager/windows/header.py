"""What a FreezeHeader promises, checked, and the window it describes.

A Freeze stream's header names the window, its model and its chunking before any byte
arrives; every chunk that follows must start where the header put it. Keyed chunks promoted
to a window describe it with a header too, so both paths check and build windows here.
"""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.timestamp_pb2 import Timestamp

from cwm_client import pb
from cwm_client.chunks import DIGEST_SIZE, DTYPE_SIZE, chunk_raw_size, token_spans
from cwm_client.errors import InvalidArgument
from cwm_client.names import check_window_name
from cwm_server.manager.catalog.base import NewChunk
from cwm_server.manager.windows.checks import check_labels, expiry_from_ttl, now_timestamp
from cwm_server.manager.windows.uploads import check_upload

MAX_TOKENS = 16_000_000

Spans = list[tuple[int, int]]
"""(token_start, token_count) of each chunk of a window, in order."""


def validate_header(header: pb.FreezeHeader, max_chunk_bytes: int) -> Spans:
    """Check a FreezeHeader; returns the (token_start, token_count) span of each chunk."""
    check_window_name(header.name)
    if header.parent:
        check_window_name(header.parent, "parent")
    check_labels(header.tags, header.description)
    fp = header.fingerprint
    if not header.HasField("fingerprint"):
        raise InvalidArgument("header.fingerprint is required", field="fingerprint")
    if fp.kv_dtype not in DTYPE_SIZE:
        raise InvalidArgument("fingerprint.kv_dtype must be set", field="fingerprint.kv_dtype")
    for name in ("num_layers", "num_kv_heads", "head_dim"):
        if getattr(fp, name) == 0:
            raise InvalidArgument(
                f"fingerprint.{name} must be positive", field=f"fingerprint.{name}"
            )
    if header.chunk_tokens == 0:
        raise InvalidArgument("chunk_tokens must be positive", field="chunk_tokens")
    if fp.block_size and header.chunk_tokens % fp.block_size:
        raise InvalidArgument(
            f"chunk_tokens {header.chunk_tokens} is not a multiple of the engine block size "
            f"{fp.block_size}",
            field="chunk_tokens",
        )
    tokens = len(header.token_ids)
    if tokens == 0 or tokens > MAX_TOKENS:
        raise InvalidArgument(
            f"token_ids must hold 1..{MAX_TOKENS} tokens, got {tokens}", field="token_ids"
        )
    full_chunk = chunk_raw_size(fp, header.chunk_tokens)
    if full_chunk > max_chunk_bytes:
        raise InvalidArgument(
            f"a chunk of {header.chunk_tokens} tokens would be {full_chunk} bytes; this "
            f"manager accepts at most {max_chunk_bytes}: use fewer chunk_tokens",
            field="chunk_tokens",
        )
    spans = token_spans(tokens, header.chunk_tokens)
    if len(header.chunk_digests) != len(spans):
        raise InvalidArgument(
            f"{tokens} tokens in chunks of {header.chunk_tokens} make {len(spans)} chunks, "
            f"but chunk_digests lists {len(header.chunk_digests)}",
            field="chunk_digests",
        )
    for index, digest in enumerate(header.chunk_digests):
        if len(digest) != DIGEST_SIZE:
            raise InvalidArgument(
                f"chunk_digests[{index}] is {len(digest)} bytes; BLAKE3 digests are {DIGEST_SIZE}",
                field=f"chunk_digests[{index}]",
            )
    expiry_from_ttl(header.ttl_seconds)
    check_upload(header)
    return spans


def check_chunk_start(
    part: pb.Chunk, header: pb.FreezeHeader, spans: Spans, last_index: int
) -> None:
    """INVALID_ARGUMENT unless `part`, the first part of a chunk arriving after chunk
    `last_index` (-1 before the first), is the chunk the header describes at its index."""
    index = part.index
    if index >= len(spans):
        raise InvalidArgument(
            f"chunk index {index} is out of range: the header describes {len(spans)} chunks",
            field="chunk.index",
        )
    if index <= last_index:
        raise InvalidArgument(
            f"chunk {index} arrived after chunk {last_index}: chunks must be sent once "
            "each, in increasing index order",
            field="chunk.index",
        )
    start, count = spans[index]
    if part.token_start != start or part.token_count != count:
        raise InvalidArgument(
            f"chunk {index} claims tokens [{part.token_start}, +{part.token_count}) but "
            f"the header puts it at [{start}, +{count})",
            field="chunk.token_start",
        )
    expected = chunk_raw_size(header.fingerprint, count)
    if part.raw_size != expected:
        raise InvalidArgument(
            f"chunk {index}: raw_size {part.raw_size} does not match the fingerprint "
            f"(2 x {header.fingerprint.num_layers} layers x {count} tokens x "
            f"{header.fingerprint.num_kv_heads} heads x {header.fingerprint.head_dim} dim "
            f"x {DTYPE_SIZE[header.fingerprint.kv_dtype]} bytes = {expected})",
            field="chunk.raw_size",
        )
    if part.digest != header.chunk_digests[index]:
        raise InvalidArgument(
            f"chunk {index}: its digest differs from chunk_digests[{index}] in the header",
            field="chunk.digest",
        )
    if part.codec not in pb.ChunkCodec.values() or part.codec == 0:
        raise InvalidArgument(f"chunk {index}: unknown codec {part.codec}", field="chunk.codec")


def window_info(
    tenant: str,
    header: pb.FreezeHeader,
    spans: Spans,
    chunks: Mapping[bytes, NewChunk],
    expires: Timestamp | None,
) -> pb.WindowInfo:
    """The window `header` describes, made of `chunks` (every digest it lists), as the
    catalog commits it."""
    refs = []
    for index, (digest, (start, count)) in enumerate(zip(header.chunk_digests, spans, strict=True)):
        stored = chunks[digest]
        refs.append(
            pb.ChunkRef(
                index=index,
                token_start=start,
                token_count=count,
                digest=digest,
                raw_size=stored.raw_size,
                stored_size=stored.stored_size,
                stored_codec=stored.codec,  # type: ignore[arg-type]
            )
        )
    window = pb.WindowInfo(
        name=header.name,
        tenant=tenant,
        session_id=header.session_id,
        cache_salt=header.cache_salt,
        fingerprint=header.fingerprint,
        token_ids=header.token_ids,
        token_count=len(header.token_ids),
        chunk_tokens=header.chunk_tokens,
        chunks=refs,
        chunk_count=len(refs),
        raw_bytes=sum(r.raw_size for r in refs),
        stored_bytes=sum(r.stored_size for r in refs),
        parent=header.parent,
        tags=dict(header.tags),
        description=header.description,
        created_at=now_timestamp(),
        pinned=header.pinned,
    )
    if expires is not None:
        window.expires_at.CopyFrom(expires)
    return window
