"""What the MCP tools return: pydantic models, so every tool publishes an output schema and
answers with structured content a model can read field by field.

Field names follow the CLI's `--json` output (`tokens`, `chunks`, `raw_bytes`, ...), so a
person who knows one knows the other.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import BaseModel, ConfigDict, Field

from cwm_client import pb


def iso_time(stamp: Timestamp, present: bool = True) -> str | None:
    """An RFC 3339 UTC time, or None for an unset timestamp."""
    if not present or (stamp.seconds == 0 and stamp.nanos == 0):
        return None
    return datetime.fromtimestamp(stamp.seconds + stamp.nanos / 1e9, UTC).isoformat()


class ModelSummary(BaseModel):
    """The model and engine whose KV a window holds; a thaw needs an engine that matches."""

    model_id: str
    engine: str
    kv_dtype: str = Field(description="element type of the stored KV, e.g. KV_DTYPE_BFLOAT16")
    num_layers: int
    num_kv_heads: int
    head_dim: int


class WindowSummary(BaseModel):
    """A frozen window: the exact tokens of a session and the KV chunks that hold them."""

    name: str
    session_id: str = Field(description="session the window was frozen from")
    cache_salt: str = Field(description="the session's engine cache_salt")
    tokens: int = Field(description="number of tokens whose KV is stored")
    chunks: int = Field(description="number of KV chunks")
    chunk_tokens: int = Field(description="tokens per chunk (the last may hold fewer)")
    raw_bytes: int = Field(description="size of the KV as the engine holds it")
    stored_bytes: int = Field(description="size on the manager's disk after compression")
    parent: str | None = Field(description="window this one was cloned or grown from")
    tags: dict[str, str]
    description: str
    created_at: str | None
    expires_at: str | None = Field(description="when the window may be collected; null: never")
    pinned: bool
    model: ModelSummary


class ChunkSummary(BaseModel):
    """One chunk of a window: a span of tokens and the BLAKE3 digest of its KV bytes."""

    index: int
    token_start: int
    tokens: int
    digest: str = Field(description="BLAKE3-256 of the raw KV bytes, hex")
    raw_bytes: int
    stored_bytes: int


class WindowDetail(WindowSummary):
    """A window with its chunk list (window_status)."""

    chunk_list: list[ChunkSummary]


class SessionSummary(BaseModel):
    """A live session on an engine, as its agent reports it."""

    session_id: str
    agent_id: str = Field(description="agent hosting the session")
    cache_salt: str = Field(description="send this cache_salt with requests that continue it")
    tokens: int = Field(description="tokens whose KV the engine holds for the session")
    last_active: str | None
    last_window: str | None = Field(description="window it was last frozen to or thawed from")
    endpoint: str | None = Field(description="the engine's OpenAI-style HTTP endpoint")


class FreezeResult(BaseModel):
    """A committed window and what the freeze moved."""

    window: WindowSummary
    agent_id: str = Field(description="agent that froze the session")
    chunks_sent: int = Field(description="chunks the agent sent")
    chunks_reused: int = Field(description="chunks the store already held (not sent again)")
    bytes_sent: int


class CompletionBody(BaseModel):
    """The JSON body of POST <endpoint>/v1/completions that continues a thawed session: the
    session's cache_salt, and any other field its engine keys the session by (llama-server's
    id_slot)."""

    model_config = ConfigDict(extra="allow")

    cache_salt: str
    prompt: list[int] = Field(
        description="the window's token ids; append your new token ids to this list"
    )
    max_tokens: int = 16


class ContinueRequest(BaseModel):
    """The HTTP request that continues a thawed session on its engine."""

    method: Literal["POST"] = "POST"
    url: str
    body: CompletionBody
    note: str


class ThawResult(BaseModel):
    """Where a thawed window now lives as a session, and how to continue it."""

    window: str
    session_id: str
    cache_salt: str
    agent_id: str
    endpoint: str = Field(description="the engine's OpenAI-style HTTP endpoint")
    tokens: int = Field(description="tokens loaded into the engine's cache")
    chunks: int
    raw_bytes: int
    continue_with: ContinueRequest


class WindowList(BaseModel):
    """One page of windows, ordered by name."""

    windows: list[WindowSummary]
    count: int = Field(description="windows on this page")
    next_page_token: str | None = Field(
        description="pass as page_token for the next page; null on the last page"
    )


class WindowStatus(BaseModel):
    """A window with its lineage."""

    window: WindowDetail
    lineage: list[WindowSummary] = Field(
        description="ancestors by parent link, nearest first (parent, grandparent, ...)"
    )
    lineage_note: str | None = Field(
        description="why the lineage stops early (an ancestor was deleted), else null"
    )


class SessionStatus(BaseModel):
    """A session: where it is live, and the windows frozen from it."""

    session_id: str
    live: bool = Field(description="whether a connected agent reports the session now")
    hosts: list[SessionSummary] = Field(description="the agents where the session is live")
    windows: list[WindowSummary] = Field(description="windows frozen from this session")


class StatusResult(BaseModel):
    """window_status: exactly one of `window` or `session` is set, per the query."""

    kind: Literal["window", "session"]
    window: WindowStatus | None = None
    session: SessionStatus | None = None


class DeleteResult(BaseModel):
    """What a delete freed; chunks other windows still use stay."""

    name: str
    deleted: bool
    chunks_freed: int
    bytes_freed: int


class SessionList(BaseModel):
    """Live sessions on the connected agents, ordered by agent then session id."""

    sessions: list[SessionSummary]
    count: int


class HealthResult(BaseModel):
    """Whether the manager answers, and what it holds."""

    manager: str = Field(description="the manager address this bridge talks to")
    reachable: bool = Field(
        description="the manager answered (true also when it refused this bridge's token or "
        "role: error says so); false when it did not answer at all"
    )
    agents: int = Field(description="connected agents")
    agent_ids: list[str]
    windows: int = Field(description="windows in the catalog")
    error: str | None = Field(
        description="why the manager did not answer, or what it refused, else null"
    )


def model_summary(fp: pb.ModelFingerprint) -> ModelSummary:
    return ModelSummary(
        model_id=fp.model_id,
        engine=fp.engine_name,
        kv_dtype=pb.KvDtype.Name(fp.kv_dtype),
        num_layers=fp.num_layers,
        num_kv_heads=fp.num_kv_heads,
        head_dim=fp.head_dim,
    )


def window_summary(window: pb.WindowInfo) -> WindowSummary:
    return WindowSummary(
        name=window.name,
        session_id=window.session_id,
        cache_salt=window.cache_salt,
        tokens=window.token_count,
        chunks=window.chunk_count,
        chunk_tokens=window.chunk_tokens,
        raw_bytes=window.raw_bytes,
        stored_bytes=window.stored_bytes,
        parent=window.parent or None,
        tags=dict(window.tags),
        description=window.description,
        created_at=iso_time(window.created_at),
        expires_at=iso_time(window.expires_at, window.HasField("expires_at")),
        pinned=window.pinned,
        model=model_summary(window.fingerprint),
    )


def window_detail(window: pb.WindowInfo) -> WindowDetail:
    return WindowDetail(
        **window_summary(window).model_dump(),
        chunk_list=[
            ChunkSummary(
                index=ref.index,
                token_start=ref.token_start,
                tokens=ref.token_count,
                digest=ref.digest.hex(),
                raw_bytes=ref.raw_size,
                stored_bytes=ref.stored_size,
            )
            for ref in window.chunks
        ],
    )


def session_summary(session: pb.SessionInfo, endpoints: dict[str, str]) -> SessionSummary:
    return SessionSummary(
        session_id=session.session_id,
        agent_id=session.agent_id,
        cache_salt=session.cache_salt,
        tokens=session.token_count,
        last_active=iso_time(session.last_active),
        last_window=session.last_window or None,
        endpoint=endpoints.get(session.agent_id),
    )
