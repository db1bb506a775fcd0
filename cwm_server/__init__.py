"""cwm_server: the manager, and (later) the host agent and the MCP bridge."""
