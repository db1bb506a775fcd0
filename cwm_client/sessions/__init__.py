"""Clients of SessionService (agents, live sessions, freeze and thaw orders), blocking and
asyncio; both send the requests built in `requests`."""

from cwm_client.sessions.async_client import AsyncSessionClient
from cwm_client.sessions.sync_client import SessionClient

__all__ = ["AsyncSessionClient", "SessionClient"]
