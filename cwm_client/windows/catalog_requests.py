"""The WindowService requests both window clients send, built in one place so the blocking
and asyncio clients cannot drift apart in what they ask."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cwm_client import pb
from cwm_client.messages import build


def thaw_request(
    name: str,
    first_chunk: int,
    chunk_count: int,
    accept_codecs: Sequence[int],
    bulk_transports: Sequence[int] = (),
) -> pb.ThawRequest:
    """A thaw of `name` (or a range of its chunks) on one stream (and, where the manager
    offers one of `bulk_transports`, on a bulk connection beside it)."""
    return build(
        pb.ThawRequest,
        name=name,
        first_chunk=first_chunk,
        chunk_count=chunk_count,
        accept_codecs=accept_codecs,
        bulk_transports=bulk_transports,
    )


def get_request(name: str, view: int) -> pb.GetWindowRequest:
    return pb.GetWindowRequest(name=name, view=view)  # type: ignore[arg-type]


def list_request(
    *,
    page_size: int,
    page_token: str,
    name_prefix: str,
    session_id: str,
    model_id: str,
    tags: Mapping[str, str] | None,
    search: str,
    view: int,
) -> pb.ListWindowsRequest:
    return build(
        pb.ListWindowsRequest,
        page_size=page_size,
        page_token=page_token,
        name_prefix=name_prefix,
        session_id=session_id,
        model_id=model_id,
        tags=dict(tags or {}),
        search=search,
        view=view,
    )


def clone_request(
    source_name: str,
    new_name: str,
    *,
    description: str,
    tags: Mapping[str, str] | None,
    ttl_seconds: int,
) -> pb.CloneWindowRequest:
    return build(
        pb.CloneWindowRequest,
        source_name=source_name,
        new_name=new_name,
        description=description,
        tags=dict(tags or {}),
        ttl_seconds=ttl_seconds,
    )
