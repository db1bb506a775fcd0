"""What the end-to-end vLLM tests share: prompts, completions under a salt, reading a reply,
and waiting for an agent to report a session (`tests.ops_helpers.wait_for` polls)."""

from __future__ import annotations

from typing import Any

import numpy as np

from cwm_client import SessionClient
from cwm_server.agent.engines.vllm.launch import complete_greedy
from tests.ops_helpers import wait_for


def prompt(seed: int, count: int) -> list[int]:
    """Random ids above the special tokens: a context the model has never seen."""
    return [int(t) for t in np.random.default_rng(seed).integers(16, 2048, size=count)]


def complete_salted(url: str, model: str, tokens: list[int], salt: str, **extra: Any) -> Any:
    """A greedy completion of `tokens` under `salt` (one token unless `extra` says), with
    the reply's token ids."""
    return complete_greedy(url, model, tokens, salt, **{"return_token_ids": True, **extra})


def cached(reply: Any) -> int:
    """The prompt tokens vLLM did not compute (prefix cache or the connector)."""
    return int(reply["usage"]["prompt_tokens_details"]["cached_tokens"] or 0)


def tokens_of(reply: Any) -> list[int]:
    return list(reply["choices"][0]["token_ids"])


def wait_reported(sessions: SessionClient, agent_id: str, session_id: str, tokens: int) -> None:
    wait_for(
        lambda: any(
            s.session_id == session_id and s.token_count == tokens
            for s in sessions.list_sessions(agent_id)
        ),
        timeout=30,
        what=f"session {session_id} with {tokens} tokens to be reported by {agent_id}",
    )
