"""The MCP bridge as a real MCP client sees it: `cwm mcp` as a subprocess, reached with the
`mcp` SDK's own client over stdio and over streamable HTTP, in front of a real manager and a
real reference-engine agent. Every hop is real: MCP to the bridge, gRPC to the manager,
orders to the agent, HTTP to the engine."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.types import CallToolResult, TextContent

from cwm_server.agent.engines.reference.adapter import ReferenceAdapter
from cwm_server.agent.engines.reference.engine import ReferenceEngine
from cwm_server.agent.host_agent import HostAgent
from cwm_server.manager.config import ManagerConfig
from tests.helpers import ROOT, ThreadedAgent, ThreadedManager, free_port

TOOLS = {
    "window_freeze",
    "window_thaw",
    "window_list",
    "window_status",
    "window_clone",
    "window_delete",
    "session_list",
    "cwm_health",
}
READ_ONLY = {"window_list", "window_status", "session_list", "cwm_health"}
Bridge = Callable[[], AbstractAsyncContextManager[Client]]


def _prompt(seed: int, count: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(16, 2048, size=count)]


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


class Stack:
    """A manager and one agent beside a reference engine, as in production."""

    def __init__(self, data_dir: Path, model_dir: Path) -> None:
        self.manager = ThreadedManager(ManagerConfig(data_dir=data_dir, listen="127.0.0.1:0"))
        self.engine = ReferenceAdapter(ReferenceEngine(model_dir))
        self.agent = ThreadedAgent(HostAgent(self.engine, self.manager.target, "node-a"))
        self.agent.wait_connected()

    def close(self) -> None:
        self.agent.stop()
        self.engine.close()
        self.manager.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    running = Stack(tmp_path_factory.mktemp("mcp") / "data", tiny_model_dir)
    yield running
    running.close()


def _bridge_args(target: str, *extra: str) -> list[str]:
    return ["-m", "cwm_server.cli.main", "mcp", "--manager", target, *extra]


@asynccontextmanager
async def stdio_bridge(target: str, log: Path) -> AsyncIterator[Client]:
    """`cwm mcp` launched by the SDK's stdio client, as Claude Code launches it, with the
    initialize handshake today's clients use (HTTP below negotiates the newest protocol)."""
    params = StdioServerParameters(command=sys.executable, args=_bridge_args(target), cwd=str(ROOT))
    with log.open("a") as errlog:
        async with Client(stdio_client(params, errlog=errlog), mode="legacy") as client:
            yield client


@asynccontextmanager
async def http_bridge(target: str, log: Path) -> AsyncIterator[Client]:
    """`cwm mcp --http` as its own process, reached by URL."""
    port = free_port()
    with log.open("ab") as errlog:
        proc = subprocess.Popen(
            [sys.executable, *_bridge_args(target, "--http", f"127.0.0.1:{port}")],
            cwd=ROOT,
            stdout=errlog,
            stderr=errlog,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"bridge exited: {log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("the HTTP bridge did not start") from None
                await asyncio.sleep(0.05)
        async with Client(f"http://127.0.0.1:{port}/mcp") as client:
            yield client
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(params=["stdio", "http"])
def bridge(request: pytest.FixtureRequest, stack: Stack, tmp_path: Path) -> Bridge:
    opener = stdio_bridge if request.param == "stdio" else http_bridge
    return lambda: opener(stack.manager.target, tmp_path / "bridge.log")


def _text(result: CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


async def _ok(client: Client, tool: str, events: list[Any] | None = None, **args: Any) -> Any:
    """Call a tool that must succeed; its progress notifications go to `events`."""

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        assert events is not None
        events.append((progress, total, message))

    result = await client.call_tool(
        tool, args, progress_callback=on_progress if events is not None else None
    )
    assert not result.is_error, _text(result)
    assert result.structured_content is not None
    return result.structured_content


async def _fails(client: Client, tool: str, code: str, *hints: str, **args: Any) -> str:
    result = await client.call_tool(tool, args)
    text = _text(result)
    assert result.is_error, f"{tool}({args}) should fail, got {text}"
    assert f": {code}: " in text, text
    for hint in hints:
        assert hint in text, text
    return text


async def _wait_session(client: Client, session_id: str, tokens: int) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listed = await _ok(client, "session_list")
        for session in listed["sessions"]:
            if session["session_id"] == session_id and session["tokens"] == tokens:
                return session  # type: ignore[no-any-return]
        await asyncio.sleep(0.1)
    raise AssertionError(f"session {session_id} with {tokens} tokens never reported")


async def test_list_tools_shows_the_eight_tools_with_schemas_and_annotations(
    bridge: Bridge,
) -> None:
    async with bridge() as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == TOOLS
        for name, tool in tools.items():
            assert tool.description and len(tool.description) > 60, name
            assert tool.input_schema["type"] == "object", name
            assert tool.output_schema is not None and tool.output_schema["type"] == "object"
            hints = tool.annotations
            assert hints is not None, name
            assert hints.read_only_hint is (name in READ_ONLY), name
            assert hints.destructive_hint is (name == "window_delete"), name
            if name in READ_ONLY:
                assert hints.idempotent_hint is True, name
        freeze = tools["window_freeze"].input_schema
        assert set(freeze["required"]) == {"session_id", "window_name"}
        assert {"description", "tags", "ttl_seconds"} <= set(freeze["properties"])
        assert set(tools["window_thaw"].input_schema["required"]) == {"window_name"}
        assert not tools["window_status"].input_schema.get("required")
        assert {"tags", "model", "session_id", "search", "page_size", "page_token"} == set(
            tools["window_list"].input_schema["properties"]
        )
        thaw_out = tools["window_thaw"].output_schema
        assert thaw_out is not None
        assert {"session_id", "cache_salt", "endpoint", "tokens", "continue_with"} <= set(
            thaw_out["properties"]
        )
        assert tools["window_freeze"].annotations.idempotent_hint is False  # type: ignore[union-attr]


async def test_freeze_list_status_clone_thaw_continue_delete(bridge: Bridge, stack: Stack) -> None:
    salt = f"mcp-flow-{time.monotonic_ns()}"
    name, branch = f"{salt}-w", f"{salt}-branch"
    context = _prompt(5, 300)
    endpoint = stack.engine.endpoint
    first = _post(
        f"{endpoint}/v1/completions", {"prompt": context, "cache_salt": salt, "max_tokens": 1}
    )
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0

    async with bridge() as client:
        live = await _wait_session(client, salt, 300)
        assert live["agent_id"] == "node-a" and live["endpoint"] == endpoint

        progress: list[Any] = []
        frozen = await _ok(
            client,
            "window_freeze",
            progress,
            session_id=salt,
            window_name=name,
            description="frozen over MCP",
            tags={"via": "mcp"},
        )
        assert frozen["agent_id"] == "node-a"
        assert frozen["window"]["name"] == name and frozen["window"]["tokens"] == 300
        assert frozen["window"]["chunks"] == 2 and frozen["chunks_sent"] == 2
        assert len(progress) >= 2 and progress[0][0] == 0 and progress[-1][0] == progress[-1][1]
        assert all(message for _, _, message in progress)

        listed = await _ok(client, "window_list", tags={"via": "mcp"})
        assert [w["name"] for w in listed["windows"]] == [name]
        assert listed["next_page_token"] is None

        status = await _ok(client, "window_status", window_name=name)
        assert status["kind"] == "window" and status["session"] is None
        window = status["window"]["window"]
        assert (window["tokens"], window["chunks"], window["chunk_tokens"]) == (300, 2, 256)
        assert [c["tokens"] for c in window["chunk_list"]] == [256, 44]
        assert all(len(c["digest"]) == 64 for c in window["chunk_list"])
        assert window["model"]["engine"] == "reference"
        assert status["window"]["lineage"] == []

        clone = await _ok(client, "window_clone", source_window=name, new_window_name=branch)
        assert clone["name"] == branch and clone["parent"] == name and clone["tokens"] == 300
        lineage = (await _ok(client, "window_status", window_name=branch))["window"]["lineage"]
        assert [w["name"] for w in lineage] == [name]

        by_session = await _ok(client, "window_status", session_id=salt)
        assert by_session["kind"] == "session" and by_session["session"]["live"] is True
        assert [h["agent_id"] for h in by_session["session"]["hosts"]] == ["node-a"]
        assert {w["name"] for w in by_session["session"]["windows"]} == {name, branch}

        progress = []
        thawed = await _ok(
            client,
            "window_thaw",
            progress,
            window_name=branch,
            agent_id="node-a",
            new_session_id=f"{salt}-thawed",
        )
        assert len(progress) >= 2 and progress[-1][0] == progress[-1][1]
        assert thawed["session_id"] == thawed["cache_salt"] == f"{salt}-thawed"
        assert thawed["agent_id"] == "node-a" and thawed["endpoint"] == endpoint
        assert thawed["tokens"] == 300 and thawed["chunks"] == 2
        how = thawed["continue_with"]
        assert how["method"] == "POST" and how["url"] == f"{endpoint}/v1/completions"
        assert how["body"]["prompt"] == context
        assert how["body"]["cache_salt"] == f"{salt}-thawed"

        # Continue exactly as the tool says: its body, one new token appended.
        body = dict(how["body"], prompt=[*how["body"]["prompt"], 42], max_tokens=1)
        reply = _post(how["url"], body)
        assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 300
        assert reply["usage"]["prompt_tokens"] == 301

        for gone in (branch, name):
            deleted = await _ok(client, "window_delete", window_name=gone)
            assert deleted["name"] == gone and deleted["deleted"] is True
        empty = await _ok(client, "window_list")
        assert empty["windows"] == [] and empty["count"] == 0


async def test_bad_inputs_are_tool_errors_with_the_code_and_the_bridge_keeps_serving(
    bridge: Bridge, stack: Stack
) -> None:
    salt = f"mcp-bad-{time.monotonic_ns()}"
    name = f"{salt}-w"
    _post(
        f"{stack.engine.endpoint}/v1/completions",
        {"prompt": _prompt(9, 40), "cache_salt": salt, "max_tokens": 1},
    )
    async with bridge() as client:
        await _wait_session(client, salt, 40)
        await _ok(client, "window_freeze", session_id=salt, window_name=name)

        text = await _fails(client, "window_status", "NOT_FOUND", window_name="no-such-window")
        assert "NOT_FOUND: no window 'no-such-window' — window_list shows what exists" in text
        assert "`cwm" not in text  # the manager's CLI hint is replaced by the tools'
        await _fails(client, "window_thaw", "NOT_FOUND", "window_list", window_name="nope")
        await _fails(client, "window_delete", "NOT_FOUND", "window_list", window_name="nope")
        await _fails(client, "window_clone", "NOT_FOUND", source_window="nope", new_window_name="x")
        await _fails(
            client,
            "window_freeze",
            "NOT_FOUND",
            "session_list",
            session_id="no-such-session",
            window_name="x",
        )
        await _fails(
            client, "window_thaw", "NOT_FOUND", "cwm_health", window_name=name, agent_id="nobody"
        )
        text = await _fails(
            client,
            "window_thaw",
            "ALREADY_EXISTS",
            "choose another new_session_id",
            window_name=name,
            agent_id="node-a",
            new_session_id=salt,  # the live session it was frozen from
        )
        assert "window_delete" not in text

        await _fails(
            client, "window_freeze", "INVALID_ARGUMENT", session_id=salt, window_name="bad name!"
        )
        await _fails(
            client, "window_clone", "INVALID_ARGUMENT", source_window=name, new_window_name="a/b"
        )
        text = await _fails(
            client,
            "window_freeze",
            "INVALID_ARGUMENT",
            session_id=salt,
            window_name=f"{name}-ttl",
            ttl_seconds=2**70,
        )
        assert "ttl_seconds" in text

        await _fails(
            client,
            "window_freeze",
            "ALREADY_EXISTS",
            "window_delete",
            session_id=salt,
            window_name=name,
        )
        await _fails(
            client, "window_clone", "ALREADY_EXISTS", source_window=name, new_window_name=name
        )

        await _fails(client, "window_status", "INVALID_ARGUMENT", "neither")
        await _fails(
            client, "window_status", "INVALID_ARGUMENT", "both", window_name=name, session_id=salt
        )
        await _fails(
            client, "window_status", "NOT_FOUND", "session_list", session_id="no-such-session"
        )
        # Arguments that fail the input schema are the SDK's to refuse, also as is_error.
        result = await client.call_tool("window_list", {"page_size": 0})
        assert result.is_error

        health = await _ok(client, "cwm_health")
        assert health["reachable"] is True and health["agent_ids"] == ["node-a"]
        assert health["windows"] == 1 and health["error"] is None
        await _ok(client, "window_delete", window_name=name)
        assert (await _ok(client, "window_list"))["count"] == 0


def test_stdio_stdout_carries_only_protocol(stack: Stack) -> None:
    """Even at DEBUG, every byte the bridge writes to stdout is a JSON-RPC message."""
    proc = subprocess.Popen(
        [sys.executable, *_bridge_args(stack.manager.target, "--log-level", "DEBUG")],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    requests: list[dict[str, Any]] = [
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "raw", "version": "0"},
            },
        },
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
        {
            "jsonrpc": "2.0",
            "id": 3,
            "method": "tools/call",
            "params": {"name": "cwm_health", "arguments": {}},
        },
    ]
    lines: list[str] = []
    try:
        for message in requests:
            proc.stdin.write(json.dumps(message) + "\n")
            proc.stdin.flush()
            if "id" in message:
                lines.append(proc.stdout.readline())
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
        stderr = proc.stderr.read() if proc.stderr else ""
    rest = proc.stdout.read()
    messages = [json.loads(line) for line in [*lines, *rest.splitlines()] if line.strip()]
    assert all(m.get("jsonrpc") == "2.0" for m in messages)
    assert [m.get("id") for m in messages[:3]] == [1, 2, 3]
    assert {t["name"] for t in messages[1]["result"]["tools"]} == TOOLS
    assert messages[2]["result"]["structuredContent"]["reachable"] is True
    assert stderr  # the logs went somewhere, and not to stdout
