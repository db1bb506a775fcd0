"""`window_thaw`'s answer says how to continue the session on whatever engine it landed on:
the body carries the engine's own session fields (request_fields), not only a cache_salt."""

from __future__ import annotations

from cwm_client import pb
from cwm_server.mcp.tools import thaw_result


def _response(**fields: object) -> pb.ThawWindowResponse:
    return pb.ThawWindowResponse(
        session_id="slot-1",
        cache_salt="slot-1",
        agent_id="llama-b",
        endpoint="http://127.0.0.1:8080/",
        token_ids=[1, 2, 3],
        token_count=3,
        **fields,  # type: ignore[arg-type]
    )


def test_the_body_carries_llama_servers_slot_fields() -> None:
    body = thaw_result("w", _response(request_fields='{"id_slot":1,"cache_prompt":true}'))
    dumped = body.continue_with.model_dump()
    assert dumped["url"] == "http://127.0.0.1:8080/v1/completions"
    assert dumped["body"]["id_slot"] == 1 and dumped["body"]["cache_prompt"] is True
    assert dumped["body"]["prompt"] == [1, 2, 3]


def test_an_agent_without_request_fields_gets_the_cache_salt() -> None:
    dumped = thaw_result("w", _response()).continue_with.model_dump()
    assert dumped["body"]["cache_salt"] == "slot-1"
    assert set(dumped["body"]) == {"cache_salt", "prompt", "max_tokens"}
