"""Kept until used, end to end on vLLM's CPU build: a thawed window stays staged for its
session's first request, so when other prefixes have evicted its blocks from vLLM's prefix
cache by then, that request gets them re-loaded from the staging instead of recomputed.

One vLLM server with a small cache (24 blocks of 128 tokens), so a few other prompts evict
everything; windows are frozen on it and thawed back into it under new salts. Runs only where
vLLM is installed (`make test-vllm`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here (make test-vllm uses .venv-vllm)")

from cwm_client import SessionClient
from cwm_server.agent.engines.vllm import staging
from cwm_server.agent.engines.vllm.adapter import VllmAdapter
from cwm_server.agent.engines.vllm.launch import VllmServer
from cwm_server.agent.host_agent import HostAgent
from cwm_server.manager.config import ManagerConfig
from tests.helpers import ThreadedAgent, ThreadedManager, free_port
from tests.ops_helpers import wait_for
from tests.vllm_helpers import cached as _cached
from tests.vllm_helpers import complete_salted, wait_reported
from tests.vllm_helpers import prompt as _prompt
from tests.vllm_helpers import tokens_of as _tokens

BLOCK = 128
CACHE_BLOCKS = 24
pytestmark = pytest.mark.timeout(900)


class SmallCache:
    def __init__(self, base: Path, model_dir: Path) -> None:
        self.manager = ThreadedManager(ManagerConfig(data_dir=base / "data", listen="127.0.0.1:0"))
        self.dir = base / "cwm"
        self.server = VllmServer(
            model_dir,
            free_port(),
            self.dir,
            base / "vllm.log",
            cpu="0",
            max_model_len=2048,
            extra=["--num-gpu-blocks-override", str(CACHE_BLOCKS)],
        ).start()
        self.engine = VllmAdapter(self.server.url, self.dir)
        self.agent = ThreadedAgent(
            HostAgent(self.engine, self.manager.target, "small", chunk_tokens=256)
        )
        self.agent.wait_connected()
        self.sessions = SessionClient(self.manager.target)
        self.model = self.engine.model_name
        self.flooded = 0

    def complete(self, prompt: list[int], salt: str, **extra: Any) -> Any:
        return complete_salted(self.server.url, self.model, prompt, salt, **extra)

    def flood(self) -> None:
        """Other prompts, more blocks than the cache has: every earlier prefix is evicted."""
        for _ in range(4):
            self.flooded += 1
            self.complete(_prompt(1000 + self.flooded, 8 * BLOCK), f"flood-{self.flooded}")

    def wait_reported(self, session_id: str, tokens: int) -> None:
        wait_reported(self.sessions, "small", session_id, tokens)

    def staged(self) -> set[str]:
        """Thaw orders with anything left in the staging or chunk folders."""
        chunk_root = self.engine.chunk_root
        return {
            path.name
            for base in (self.dir, chunk_root)
            for path in (base / staging.LOAD_DIR).iterdir()
        }

    def close(self) -> None:
        self.sessions.close()
        self.agent.stop()
        self.engine.close()
        self.server.stop()
        self.manager.stop()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[SmallCache]:
    running = SmallCache(tmp_path_factory.mktemp("vllm-kept"), tiny_model_dir)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module")
def window(small: SmallCache) -> dict[str, Any]:
    """A 640-token window frozen on the server, and a continuation of it computed right
    after a thaw (nothing evicted): what every later continuation must equal."""
    context = _prompt(1, 700)
    history = context + _tokens(small.complete(context, "orig", max_tokens=16))
    tokens = (len(history) - 1) // BLOCK * BLOCK
    small.wait_reported("orig", tokens)
    small.sessions.freeze_session("orig", "kept-window", agent_id="small")
    continuation = history + _prompt(2, 40)
    small.sessions.thaw_window("kept-window", agent_id="small", new_session_id="fresh")
    fresh = small.complete(continuation, "fresh", max_tokens=16)
    assert _cached(fresh) == tokens
    return {"tokens": tokens, "continuation": continuation, "expected": _tokens(fresh)}


def test_the_first_request_after_an_eviction_reloads_the_kept_window(
    small: SmallCache, window: dict[str, Any]
) -> None:
    wait_for(
        lambda: not small.staged(),
        timeout=30,
        what="the fresh thaw's first use to release its staging",
    )
    small.sessions.thaw_window("kept-window", agent_id="small", new_session_id="kept")
    assert len(small.staged()) == 1 and len(small.engine.kept) == 1  # kept, not removed
    small.flood()

    reply = small.complete(window["continuation"], "kept", max_tokens=16)
    assert _cached(reply) == window["tokens"]  # re-loaded from the kept staging
    assert _tokens(reply) == window["expected"]  # the window's own bytes, as before
    wait_for(
        lambda: not small.staged(), timeout=30, what="the first use to release the kept staging"
    )
    small.engine.sessions()
    assert len(small.engine.kept) == 0
    assert len(small.engine.pool) >= 3  # its chunk files, for the next thaws to write over

    # Used once: a second eviction is an ordinary prefix-cache miss and recomputes.
    small.flood()
    again = small.complete(window["continuation"], "kept", max_tokens=1)
    assert _cached(again) < window["tokens"]


def test_a_released_window_is_recomputed_after_an_eviction(
    small: SmallCache, window: dict[str, Any]
) -> None:
    """The control: without the kept staging the flood really does cost the window."""
    pooled = len(small.engine.pool)
    small.sessions.thaw_window("kept-window", agent_id="small", new_session_id="released")
    assert len(small.engine.pool) == max(0, pooled - 3)  # its chunks were written over these
    small.engine.kept.release_all()
    assert not small.staged()
    assert len(small.engine.pool) == max(3, pooled)  # and went back for the next thaw
    small.flood()
    reply = small.complete(window["continuation"], "released", max_tokens=16)
    assert _cached(reply) < window["tokens"]


def test_a_kept_window_nobody_uses_is_removed_when_it_expires(
    small: SmallCache, window: dict[str, Any]
) -> None:
    small.engine.kept.seconds = 1.0
    try:
        small.sessions.thaw_window("kept-window", agent_id="small", new_session_id="expiring")
        (order,) = small.staged()
        keep = staging.read_json(
            staging.op_dir(small.dir, staging.LOAD_DIR, order) / staging.KEEP_FILE
        )
        assert keep["cache_salt"] == "expiring" and keep["tokens"] == window["tokens"]
        # The agent's session poll sweeps expired windows.
        wait_for(lambda: not small.staged(), timeout=10, what="the expired window to be removed")
        assert len(small.engine.kept) == 0
        small.flood()
        reply = small.complete(window["continuation"], "expiring", max_tokens=1)
        assert _cached(reply) < window["tokens"]
    finally:
        small.engine.kept.seconds = 600.0


def test_a_new_agent_adopts_the_kept_windows_of_the_one_before(
    small: SmallCache, window: dict[str, Any]
) -> None:
    small.sessions.thaw_window("kept-window", agent_id="small", new_session_id="adopted")
    (order,) = small.staged()
    successor = VllmAdapter(small.server.url, small.dir)  # as an agent restarted beside vLLM
    assert len(successor.kept) == 1 and small.staged() == {order}
    small.engine.kept = successor.kept  # the old agent is gone: it sweeps nothing now
    small.flood()
    reply = small.complete(window["continuation"], "adopted", max_tokens=16)
    assert _cached(reply) == window["tokens"]
    assert _tokens(reply) == window["expected"]
    wait_for(
        lambda: not small.staged(), timeout=30, what="the adopted window to be released by its use"
    )


def test_stopping_vllm_removes_what_is_staged_for_it(
    small: SmallCache, window: dict[str, Any]
) -> None:
    """Runs last: it stops the module's server. A kept window can never be loaded once vLLM
    is gone, so its worker clears the chunk root (shared memory) on shutdown."""
    small.sessions.thaw_window("kept-window", agent_id="small", new_session_id="at-exit")
    chunk_root = small.engine.chunk_root
    assert len(list((chunk_root / staging.LOAD_DIR).iterdir())) == 1
    small.server.stop()
    assert not chunk_root.exists()
