"""The SessionService requests both session clients send, built in one place."""

from __future__ import annotations

from collections.abc import Mapping

from cwm_client import pb
from cwm_client.messages import build


def freeze_session_request(
    session_id: str,
    window_name: str,
    *,
    description: str,
    tags: Mapping[str, str] | None,
    ttl_seconds: int,
    agent_id: str,
    replace: bool = False,
) -> pb.FreezeSessionRequest:
    return build(
        pb.FreezeSessionRequest,
        session_id=session_id,
        window_name=window_name,
        description=description,
        tags=dict(tags or {}),
        ttl_seconds=ttl_seconds,
        agent_id=agent_id,
        replace=replace,
    )


def thaw_window_request(
    window_name: str, *, agent_id: str, new_session_id: str
) -> pb.ThawWindowRequest:
    return build(
        pb.ThawWindowRequest,
        window_name=window_name,
        agent_id=agent_id,
        new_session_id=new_session_id,
    )
