"""What the connector's scheduler side hands its worker side, and the checks that decide it.

The scheduler accepts a load only for a request whose salt and prompt match a complete staged
window of this engine's KV shape, and a save only when the agent asked for it; the worker then
maps each block it must fill to the staged chunk that holds it. These decisions are plain
data in, data out, kept apart from vLLM's objects so they can be read and tested without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ChunkRef:
    file: str
    token_start: int
    token_count: int
    digest: str


@dataclass
class LoadOp:
    op_id: str
    directory: str
    block_ids: list[int]
    first_token: int
    """Window position of the first block loaded (tokens before it were already cached)."""
    chunks: list[ChunkRef]
    req_id: str = ""
    asynchronous: bool = False
    """Loaded off the engine's step; vLLM waits for `get_finished` to report `req_id`."""


@dataclass
class SaveOp:
    op_id: str
    directory: str
    block_ids: list[int]
    num_tokens: int
    chunk_tokens: int
    req_id: str = ""


def check_load_manifest(
    manifest: Any,
    cache_salt: str | None,
    prompt: list[int],
    layout: dict[str, int | str],
    block_size: int,
) -> tuple[int, list[ChunkRef]]:
    """(tokens to load, their chunks) of a staged window `manifest` for a request with
    `cache_salt` and `prompt`, on an engine whose KV has `layout` (the manifest's "layout"
    fields); ValueError saying why the request gets no hit."""
    if not isinstance(manifest, dict):
        raise ValueError("nothing is staged under this id")
    if not cache_salt or manifest.get("cache_salt") != cache_salt:
        raise ValueError("the request's cache_salt is not the staged session's")
    staged = manifest.get("layout", {})
    differing = [
        f"{k}: staged {staged.get(k)!r}, engine {v!r}"
        for k, v in layout.items()
        if staged.get(k) != v
    ]
    if differing:
        raise ValueError("the staged KV has another shape: " + "; ".join(differing))
    token_ids = manifest.get("token_ids")
    tokens = manifest.get("tokens")
    if not isinstance(token_ids, list) or not isinstance(tokens, int):
        raise ValueError("the manifest is malformed")
    if tokens <= 0 or tokens % block_size or tokens > len(token_ids):
        raise ValueError(f"{tokens} staged tokens is not a positive number of whole blocks")
    if tokens >= len(prompt):
        raise ValueError("the prompt must extend the staged tokens by at least one token")
    if prompt[:tokens] != token_ids[:tokens]:
        raise ValueError("the prompt does not start with the staged tokens")
    try:
        chunks = [
            ChunkRef(
                file=str(c["file"]),
                token_start=int(c["token_start"]),
                token_count=int(c["token_count"]),
                digest=str(c["digest"]),
            )
            for c in manifest.get("chunks", [])
        ]
    except (KeyError, TypeError, ValueError):
        raise ValueError("the manifest's chunk list is malformed") from None
    for chunk in chunks:
        if "/" in chunk.file or chunk.file.startswith("."):
            raise ValueError(f"bad chunk file name {chunk.file!r}")
    return tokens, chunks


def check_save_order(
    order: Any, cache_salt: str | None, prompt_tokens: int, block_size: int
) -> tuple[int, int]:
    """(tokens, chunk_tokens) of the agent's save `order` for a request with `cache_salt`
    and `prompt_tokens` prompt tokens; ValueError saying why it is refused."""
    if not isinstance(order, dict):
        raise ValueError("no save was requested under this id")
    if not cache_salt or order.get("cache_salt") != cache_salt:
        raise ValueError("the request's cache_salt is not the one the save was requested for")
    tokens, chunk_tokens = order.get("tokens"), order.get("chunk_tokens")
    if (
        not isinstance(tokens, int)
        or not isinstance(chunk_tokens, int)
        or tokens <= 0
        or tokens % block_size
        or chunk_tokens <= 0
        or chunk_tokens % block_size
        or tokens > prompt_tokens
    ):
        raise ValueError(f"the save order {order!r} does not fit blocks of {block_size}")
    return tokens, chunk_tokens


def blocks_by_chunk(op: LoadOp, block_size: int) -> list[tuple[ChunkRef, list[tuple[int, int]]]]:
    """For each chunk a load needs, in order: (chunk, [(index into op.block_ids, token offset
    inside the chunk)]); ValueError when no staged chunk holds a whole block."""
    out: list[tuple[ChunkRef, list[tuple[int, int]]]] = []
    for index in range(len(op.block_ids)):
        start = op.first_token + index * block_size
        chunk = next(
            (c for c in op.chunks if c.token_start <= start < c.token_start + c.token_count),
            None,
        )
        if chunk is None or start + block_size > chunk.token_start + chunk.token_count:
            raise ValueError(f"no staged chunk holds tokens {start}..{start + block_size}")
        if out and out[-1][0] is chunk:
            out[-1][1].append((index, start - chunk.token_start))
        else:
            out.append((chunk, [(index, start - chunk.token_start)]))
    return out
