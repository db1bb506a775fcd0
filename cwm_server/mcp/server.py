"""The MCP server: the `Bridge` tools on an `MCPServer`, over stdio or streamable HTTP."""

from __future__ import annotations

import importlib.metadata
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from mcp.server import MCPServer
from mcp.types import ToolAnnotations

from cwm_client import Credentials
from cwm_server.mcp.tools import Bridge

INSTRUCTIONS = """\
cwm (the context window manager) keeps the KV cache of LLM sessions as named, immutable
windows: the exact tokens and their KV, stored durably and verified. These tools reach a cwm
manager; the sessions they freeze and thaw run on engines served by cwm agents.

- session_list shows live sessions; window_freeze turns one into a window.
- window_list / window_status inspect windows (and a session's windows).
- window_clone branches a window for free; window_delete removes one.
- window_thaw loads a window into a new session on an engine and returns the exact HTTP
  request that continues it with no prefill of the window's tokens.
- cwm_health says whether the manager answers.

Errors start with a gRPC code (NOT_FOUND, INVALID_ARGUMENT, ALREADY_EXISTS,
FAILED_PRECONDITION, UNAVAILABLE, ...) followed by what to do next.
"""

_READ = ToolAnnotations(
    read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)


@dataclass(frozen=True)
class ToolSpec:
    name: str
    title: str
    description: str
    annotations: ToolAnnotations


TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(
        "window_freeze",
        "Freeze a live session into a window",
        "Freeze a live session (one running on an engine a cwm agent serves) into a new, "
        "immutable window: its exact token ids and their KV cache, stored durably and "
        "verified. session_list shows the sessions. Only chunks the store lacks are sent, so "
        "re-freezing a grown session is cheap. Fails with ALREADY_EXISTS if the name is "
        "taken. Reports progress before the order and when the window is committed.",
        ToolAnnotations(
            read_only_hint=False,
            destructive_hint=False,
            idempotent_hint=False,
            open_world_hint=False,
        ),
    ),
    ToolSpec(
        "window_thaw",
        "Thaw a window into a new engine session",
        "Load a window's KV cache into a new session on an engine (the agent named, or any "
        "whose model matches the window's), so the session continues with no prefill of the "
        "window's tokens. Returns the session id, cache_salt, endpoint, token count and "
        "continue_with: the exact request to send (POST continue_with.body to "
        "continue_with.url after appending new token ids to body.prompt; the reply's "
        "usage.prompt_tokens_details.cached_tokens shows the tokens served from the cache). "
        "Reports progress before the order and when the session is loaded.",
        ToolAnnotations(
            read_only_hint=False,
            destructive_hint=False,
            idempotent_hint=False,
            open_world_hint=False,
        ),
    ),
    ToolSpec(
        "window_list",
        "List windows",
        "List windows with their tokens, chunks, sizes, model, parent and tags, ordered by "
        "name. Filters combine: tags (all must match), model id, session id, text in the name "
        "or description. Paged: pass next_page_token back as page_token.",
        _READ,
    ),
    ToolSpec(
        "window_status",
        "Show a window or a session",
        "Give exactly one of window_name or session_id. For a window: its tokens, chunk list "
        "(digests and spans), sizes, model, and lineage (parent, grandparent, ...). For a "
        "session: the agents where it is live now and every window frozen from it.",
        _READ,
    ),
    ToolSpec(
        "window_clone",
        "Clone (branch) a window",
        "Create a new window that shares every chunk with the source (copy-on-write, no bytes "
        "copied) and names the source as its parent. Description and tags default to the "
        "source's. Fails with ALREADY_EXISTS if the new name is taken.",
        ToolAnnotations(
            read_only_hint=False,
            destructive_hint=False,
            idempotent_hint=False,
            open_world_hint=False,
        ),
    ),
    ToolSpec(
        "window_delete",
        "Delete a window",
        "Delete a window permanently; this cannot be undone. Chunks no other window uses are "
        "freed; clones and windows sharing chunks keep theirs. Live sessions are not touched.",
        ToolAnnotations(
            read_only_hint=False,
            destructive_hint=True,
            idempotent_hint=True,
            open_world_hint=False,
        ),
    ),
    ToolSpec(
        "session_list",
        "List live sessions",
        "List the live sessions that connected cwm agents report on their engines: session "
        "id (= cache_salt), hosting agent, token count, engine endpoint, last window. These "
        "are the sessions window_freeze can freeze.",
        _READ,
    ),
    ToolSpec(
        "cwm_health",
        "Check the cwm manager",
        "Whether the cwm manager answers, how many agents are connected (with their ids) and "
        "how many windows the catalog holds. Never fails: an unreachable manager is reported "
        "with reachable=false and the reason.",
        _READ,
    ),
)

TOOL_NAMES: tuple[str, ...] = tuple(spec.name for spec in TOOLS)


def _version() -> str:
    try:
        return importlib.metadata.version("cwm")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def build_server(
    manager: str, *, log_level: str = "WARNING", credentials: Credentials | None = None
) -> MCPServer[Bridge]:
    """An MCPServer whose tools call the cwm manager at `manager` (HOST:PORT), as the
    tenant of `credentials`' token."""
    bridge = Bridge(manager, credentials)

    @asynccontextmanager
    async def lifespan(_: MCPServer[Bridge]) -> AsyncIterator[Bridge]:
        async with bridge.connected() as connected:
            yield connected

    server: MCPServer[Bridge] = MCPServer(
        "cwm",
        title="cwm: context window manager",
        instructions=INSTRUCTIONS,
        version=_version(),
        lifespan=lifespan,
        log_level=log_level.upper(),  # type: ignore[arg-type]
    )
    for spec in TOOLS:
        fn: Callable[..., Awaitable[Any]] = getattr(bridge, spec.name)
        server.add_tool(
            fn,
            name=spec.name,
            title=spec.title,
            description=spec.description,
            annotations=spec.annotations,
            structured_output=True,
        )
    return server


async def serve_stdio(
    manager: str, *, log_level: str = "WARNING", credentials: Credentials | None = None
) -> None:
    """Serve MCP on stdin/stdout until the client closes stdin."""
    await build_server(manager, log_level=log_level, credentials=credentials).run_stdio_async()


async def serve_http(
    manager: str,
    host: str,
    port: int,
    *,
    path: str = "/mcp",
    log_level: str = "WARNING",
    credentials: Credentials | None = None,
) -> None:
    """Serve MCP over streamable HTTP at http://HOST:PORT/mcp until interrupted."""
    server = build_server(manager, log_level=log_level, credentials=credentials)
    await server.run_streamable_http_async(host=host, port=port, streamable_http_path=path)
