"""`cwm_health` tells a manager that refused the bridge's token (it answered) from one that
did not answer at all."""

from __future__ import annotations

from pathlib import Path

from cwm_client import Credentials
from cwm_server.manager.config import ManagerConfig, ServerOptions
from cwm_server.mcp.tools import Bridge
from tests.helpers import ThreadedManager, free_port
from tests.manager.rpc.test_auth import write_auth_file


async def health(target: str, token: str | None) -> dict[str, object]:
    bridge = Bridge(target, Credentials(token=token))
    async with bridge.connected():
        result = await bridge.cwm_health()
    return result.model_dump()


async def test_a_refused_token_is_reachable_with_the_refusal_and_silence_is_not(
    tmp_path: Path,
) -> None:
    running = ThreadedManager(
        ManagerConfig(data_dir=tmp_path / "data", listen="127.0.0.1:0", fsync=False),
        ServerOptions(auth_file=write_auth_file(tmp_path / "auth.toml")),
    )
    try:
        refused = await health(running.target, "not-a-token")
        assert refused["reachable"] is True
        assert "UNAUTHENTICATED" in str(refused["error"])
    finally:
        running.stop()
    silent = await health(f"127.0.0.1:{free_port()}", None)
    assert silent["reachable"] is False and "UNAVAILABLE" in str(silent["error"])
