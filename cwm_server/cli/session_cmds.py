"""`cwm agents`, `cwm sessions`, `cwm freeze`, `cwm thaw`: orders through the manager."""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from cwm_client import SessionClient, WindowClient, pb
from cwm_server.cli.options import Subparsers, add_command, add_ttl_option, client_credentials
from cwm_server.cli.render import (
    count_of,
    human_bytes,
    iso_time,
    print_json,
    print_table,
    table_time,
    window_dict,
)


def _session_client(args: argparse.Namespace) -> SessionClient:
    return SessionClient(args.manager, credentials=client_credentials(args))


def agent_dict(agent: pb.AgentInfo) -> dict[str, Any]:
    return {
        "agent_id": agent.agent_id,
        "endpoint": agent.endpoint,
        "model_id": agent.fingerprint.model_id,
        "engine": agent.fingerprint.engine_name,
        "sessions": agent.session_count,
        "connected_at": iso_time(agent.connected_at),
    }


def session_dict(session: pb.SessionInfo) -> dict[str, Any]:
    return {
        "session_id": session.session_id,
        "agent_id": session.agent_id,
        "tokens": session.token_count,
        "last_active": iso_time(session.last_active),
        "last_window": session.last_window,
    }


def cmd_agents(args: argparse.Namespace) -> int:
    with _session_client(args) as client:
        agents = client.list_agents()
    if args.json:
        print_json([agent_dict(a) for a in agents])
    elif agents:
        print_table(
            ["AGENT", "ENDPOINT", "MODEL", "ENGINE", "SESSIONS"],
            (
                [
                    a.agent_id,
                    a.endpoint,
                    a.fingerprint.model_id,
                    a.fingerprint.engine_name,
                    str(a.session_count),
                ]
                for a in agents
            ),
        )
    else:
        print("no agents connected")
    return 0


def cmd_sessions(args: argparse.Namespace) -> int:
    with _session_client(args) as client:
        sessions = client.list_sessions(args.agent or "")
    if args.json:
        print_json([session_dict(s) for s in sessions])
    elif sessions:
        print_table(
            ["SESSION", "AGENT", "TOKENS", "LAST ACTIVE (UTC)", "LAST WINDOW"],
            (
                [
                    s.session_id,
                    s.agent_id,
                    str(s.token_count),
                    table_time(s.last_active),
                    s.last_window or "-",
                ]
                for s in sessions
            ),
        )
    else:
        print("no live sessions")
    return 0


FREEZE_NOTICE_S = 2.0
"""How long a freeze may take before the CLI says what it is waiting for."""


def cmd_freeze(args: argparse.Namespace) -> int:
    with _session_client(args) as client, ThreadPoolExecutor(1) as worker:
        order = worker.submit(
            client.freeze_session,
            args.session,
            args.window,
            description=args.description or "",
            ttl_seconds=args.ttl or 0,
            agent_id=args.agent or "",
            replace=args.replace,
        )
        try:
            response = order.result(timeout=FREEZE_NOTICE_S)
        except FutureTimeout:
            # An engine busy generating for the session finishes that first: say so,
            # rather than sit silent.
            print(
                f"waiting for the agent to freeze {args.session!r} (a generation in progress "
                "on it finishes first) ...",
                file=sys.stderr,
            )
            response = order.result()
    if args.json:
        out = window_dict(response.window)
        out.update(
            agent_id=response.agent_id,
            chunks_sent=response.chunks_sent,
            chunks_reused=response.chunks_reused,
            bytes_sent=response.bytes_sent,
        )
        print_json(out)
    else:
        print(
            f"froze session {args.session} on {response.agent_id} as {response.window.name}: "
            f"{count_of(response.window.token_count, 'token')}, "
            f"{count_of(response.chunks_sent, 'chunk')} sent "
            f"({human_bytes(response.bytes_sent)}), {response.chunks_reused} already stored"
        )
    return 0


def cmd_thaw(args: argparse.Namespace) -> int:
    with _session_client(args) as client:
        response = client.thaw_window(
            args.window, agent_id=args.agent or "", new_session_id=args.session or ""
        )
    if args.json:
        with WindowClient(args.manager, credentials=client_credentials(args)) as windows:
            token_ids = list(windows.get(args.window).token_ids)
        print_json(
            {
                "window": args.window,
                "token_ids": token_ids,
                "session_id": response.session_id,
                "cache_salt": response.cache_salt,
                "request_fields": json.loads(response.request_fields or "{}"),
                "agent_id": response.agent_id,
                "endpoint": response.endpoint,
                "tokens": response.token_count,
                "chunks": response.chunks,
                "raw_bytes": response.raw_bytes,
            }
        )
    else:
        fields = response.request_fields or json.dumps({"cache_salt": response.cache_salt})
        print(
            f"thawed {args.window} into session {response.session_id} on {response.agent_id} "
            f"({count_of(response.token_count, 'token')}, {count_of(response.chunks, 'chunk')})\n"
            f"continue with: POST {response.endpoint}/v1/completions "
            f'{fields[:-1]}, "prompt": <the {response.token_count} '
            f"token ids (cwm show {args.window} --tokens) + your new tokens>}}"
        )
    return 0


def add_parsers(sub: Subparsers) -> None:
    agents = add_command(sub, "agents", help="list connected agents")
    agents.set_defaults(handler=cmd_agents, needs_client=False)

    sessions = add_command(sub, "sessions", help="list live sessions on the agents")
    sessions.add_argument("--agent", help="only this agent's sessions")
    sessions.set_defaults(handler=cmd_sessions, needs_client=False)

    freeze = add_command(sub, "freeze", help="freeze a live session into a window")
    freeze.add_argument("session")
    freeze.add_argument("window")
    freeze.add_argument("--agent", help="the hosting agent, if several report the session")
    freeze.add_argument("--description")
    freeze.add_argument(
        "--replace",
        action="store_true",
        help="replace a window of that name if one exists (atomically: the old one stays "
        "until the new one is committed)",
    )
    add_ttl_option(
        freeze,
        help="window lifetime: 5m, 1h, 24h, 7d, <n>s/m/h/d or seconds; never/pinned: no expiry",
    )
    freeze.set_defaults(handler=cmd_freeze, needs_client=False)

    thaw = add_command(sub, "thaw", help="load a window into a new session on an agent")
    thaw.add_argument("window")
    thaw.add_argument("--agent", help="agent to thaw into (default: any matching engine)")
    thaw.add_argument("--session", help="id (cache_salt) for the new session")
    thaw.set_defaults(handler=cmd_thaw, needs_client=False)
