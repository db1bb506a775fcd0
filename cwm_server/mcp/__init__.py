"""The MCP bridge: cwm's window tools for MCP clients (Claude Code and others).

`cwm mcp --manager HOST:PORT` serves them over stdio, `--http HOST:PORT` over streamable
HTTP. Each tool is a thin call through `cwm_client`'s asyncio clients; see docs/MCP.md.
Importing this package needs the `mcp` extra (`pip install 'cwm[mcp]'`).
"""

from cwm_server.mcp.server import TOOL_NAMES, TOOLS, build_server, serve_http, serve_stdio
from cwm_server.mcp.tools import Bridge

__all__ = ["TOOLS", "TOOL_NAMES", "Bridge", "build_server", "serve_http", "serve_stdio"]
