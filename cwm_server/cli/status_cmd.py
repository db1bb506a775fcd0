"""`cwm status`: is the manager up, healthy or degraded, and what does it hold.

It reads the standard gRPC health service (what a load balancer or `grpc_health_probe`
sees) and the connected agents. Exit status: 0 when the manager serves (healthy or
degraded), 2 when it answers NOT_SERVING, 1 when it cannot be reached.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cwm_client import Credentials, SessionClient
from cwm_client.errors import CwmError
from cwm_server.cli.options import Subparsers, add_command, client_credentials
from cwm_server.cli.render import print_json

SERVICES = ("", "cwm.v1.WindowService", "cwm.v1.SessionService")
KNOWN_COMPONENTS = ("cwm.catalog", "cwm.tier.disk", "cwm.tier.memory", "cwm.tier.redis")
"""Asked one by one when the manager's health service has no List (older grpcio)."""
DETAIL_KEY = "cwm-health-detail"


def _status_name(status: int) -> str:
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status))


def _check(stub: Any, name: str, timeout: float) -> tuple[str, str] | None:
    try:
        response, call = stub.Check.with_call(
            health_pb2.HealthCheckRequest(service=name), timeout=timeout
        )
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None  # no such component on this manager
        raise
    detail = ""
    for key, value in call.trailing_metadata() or ():
        if key == DETAIL_KEY:
            detail = value
    return _status_name(response.status), detail


def read_health(
    target: str, timeout: float, credentials: Credentials | None = None
) -> dict[str, Any]:
    """Health is open to anyone who reaches the port; `credentials` only for TLS."""
    with (credentials or Credentials()).channel(target, ()) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        names = [*SERVICES, *KNOWN_COMPONENTS]
        list_rpc = getattr(stub, "List", None)
        if list_rpc is not None and hasattr(health_pb2, "HealthListRequest"):
            try:
                names = sorted(list_rpc(health_pb2.HealthListRequest(), timeout=timeout).statuses)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
        found = {name: _check(stub, name, timeout) for name in names}
        checks = {name: result for name, result in found.items() if result is not None}
    services = {name: checks[name][0] for name in SERVICES if name in checks}
    components = {
        name: {"status": status, "detail": detail}
        for name, (status, detail) in checks.items()
        if name not in SERVICES
    }
    serving = services.get("", "UNKNOWN") == "SERVING"
    degraded = serving and any(c["status"] != "SERVING" for c in components.values())
    state = "degraded" if degraded else "serving" if serving else "not serving"
    return {
        "manager": target,
        "state": state,
        "services": {name or "(overall)": status for name, status in services.items()},
        "components": components,
        "reason": checks.get("", ("", ""))[1],
    }


def cmd_status(args: argparse.Namespace) -> int:
    try:
        credentials = client_credentials(args)
        report = read_health(args.manager, args.timeout, credentials)
    except grpc.RpcError as exc:
        print(
            f"error: manager {args.manager} did not answer ({exc.code().name}: {exc.details()})",
            file=sys.stderr,
        )
        return 1
    if report["state"] != "not serving":
        try:
            with SessionClient(args.manager, credentials=credentials) as sessions:
                report["agents"] = [a.agent_id for a in sessions.list_agents()]
        except CwmError:
            report["agents"] = None
    if args.json:
        print_json(report)
    else:
        print(f"manager {report['manager']}: {report['state']}")
        if report["reason"] and report["state"] == "not serving":
            print(f"  reason: {report['reason']}")
        for name, status in report["services"].items():
            print(f"  {name:<24} {status}")
        for name, info in report["components"].items():
            detail = f"  ({info['detail']})" if info["detail"] else ""
            print(f"  {name:<24} {info['status']}{detail}")
        agents = report.get("agents")
        if agents is not None:
            print(
                f"  agents: {len(agents)} connected" + (f" ({', '.join(agents)})" if agents else "")
            )
    return {"serving": 0, "degraded": 0}.get(report["state"], 2)


def add_parser(sub: Subparsers) -> None:
    status = add_command(sub, "status", help="is the manager serving, degraded or down")
    status.add_argument(
        "--timeout", type=float, default=5.0, metavar="SECONDS", help="per call (default 5)"
    )
    status.set_defaults(handler=cmd_status, needs_client=False)
