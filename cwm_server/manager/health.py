"""Manager health: components report conditions, the standard gRPC health service tells.

Every part of the manager that can fail on its own (a storage tier, the catalog, the
Redis tier) is a *component* with a health name of its own, e.g. ``cwm.tier.disk``. A
component is in one of three conditions:

- ``OK``: it works;
- ``DEGRADED``: it works with a problem an operator should look at (the disk is nearly full;
  an optional tier such as Redis is gone and the manager serves from its local tiers);
- ``DOWN``: it does not work.

The ``grpc.health.v1.Health`` service answers for these names:

================================  ===========================================================
``""`` (the whole manager)        SERVING unless an *essential* component is DOWN or the
``cwm.v1.WindowService``          manager is shutting down. Essential: the disk tier and the
``cwm.v1.SessionService``         catalog (a manager without them cannot keep a window).
``cwm.tier.disk`` and the other   SERVING only while that component is OK; NOT_SERVING when
component names                   it is DEGRADED or DOWN.
================================  ===========================================================

So *degraded* reads as: the services SERVING, at least one component NOT_SERVING. A load
balancer or Kubernetes probe asks ``""`` (or a service name) and keeps sending work to a
degraded manager, which is what it should do: it still keeps and serves windows. Monitoring
asks ``Health/List`` (or ``cwm status``) and sees which component is unwell. A Check of a
component name also carries the reason in the trailing metadata key ``cwm-health-detail``.

Checks run at start and then every ``interval`` seconds. Tiers that learn of a
failure while working (a Redis client losing its connection) call ``HealthBoard.report``
instead of waiting for the next check.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
import grpc.aio
import structlog
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from cwm_client.errors import CwmError, NotFound, ResourceExhausted
from cwm_server.manager.windows.manager import WindowManager

log = structlog.get_logger("cwm.health")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

OVERALL = ""
WINDOW_SERVICE = "cwm.v1.WindowService"
SESSION_SERVICE = "cwm.v1.SessionService"
SERVICES = (OVERALL, WINDOW_SERVICE, SESSION_SERVICE)
DETAIL_KEY = "cwm-health-detail"
PROBE_PREFIX = ".health-probe."
PROBE_SUFFIX = ".tmp"
CHECK_TIMEOUT_S = 10.0


class Level(enum.IntEnum):
    OK = 0
    DEGRADED = 1
    DOWN = 2


@dataclass(frozen=True)
class Condition:
    level: Level
    detail: str
    since: float


class Check(Protocol):
    """One component's check."""

    name: str
    essential: bool

    async def run(self) -> tuple[Level, str]: ...


class CwmHealthServicer(HealthServicer):
    """grpcio's asyncio health servicer, plus `List` and a reason on component checks."""

    def __init__(self) -> None:
        super().__init__()
        self.details: dict[str, str] = {}

    async def Check(  # noqa: N802 - gRPC method name
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        detail = self.details.get(request.service)
        if detail:
            # Keep what the interceptor set (the request id) and add the reason.
            kept = tuple(context.trailing_metadata() or ())
            context.set_trailing_metadata((*kept, (DETAIL_KEY, _ascii(detail))))
        if request.service not in self._server_status:
            # NOT_FOUND, as the health protocol says, with cwm's ErrorInfo and BadRequest.
            raise NotFound(
                f"no health status for {request.service!r}; Health/List names them all",
                reason="SERVICE_UNKNOWN",
                field="service",
            )
        response: health_pb2.HealthCheckResponse = await super().Check(request, context)
        return response

    async def List(  # noqa: N802
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        response = health_pb2.HealthListResponse()
        for name, status in sorted(self._server_status.items()):
            response.statuses[name].status = status
        return response


def _ascii(text: str) -> str:
    """Metadata values must be printable ASCII."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:1024]


class HealthBoard:
    """Holds every component's condition and keeps the health servicer in step with it."""

    def __init__(
        self, servicer: CwmHealthServicer, checks: Sequence[Check], interval_s: float = 5.0
    ) -> None:
        self.servicer = servicer
        self.interval_s = interval_s
        self._checks = list(checks)
        self._essential = {c.name for c in checks if c.essential}
        self.conditions: dict[str, Condition] = {}
        self._shutting_down = False
        self.on_change: list[Callable[[str, Condition], None]] = []

    @property
    def components(self) -> list[str]:
        return sorted({c.name for c in self._checks} | set(self.conditions))

    def overall_serving(self) -> bool:
        return not self._shutting_down and not any(
            cond.level is Level.DOWN
            for name, cond in self.conditions.items()
            if name in self._essential
        )

    def degraded(self) -> bool:
        return any(cond.level is not Level.OK for cond in self.conditions.values())

    async def report(
        self, name: str, level: Level, detail: str = "", *, essential: bool | None = None
    ) -> None:
        """Set a component's condition (also for components without a periodic check)."""
        if essential is True:
            self._essential.add(name)
        elif essential is False:
            self._essential.discard(name)
        old = self.conditions.get(name)
        if old is not None and old.level is level and old.detail == detail:
            return
        since = old.since if old is not None and old.level is level else time.time()
        changed = Condition(level, detail, since)
        self.conditions[name] = changed
        if (old is None and level is not Level.OK) or (old is not None and old.level is not level):
            log_fn = log.info if level is Level.OK else log.warning
            log_fn("health_changed", component=name, condition=level.name, detail=detail)
        for callback in self.on_change:
            callback(name, changed)
        await self._publish()

    async def _publish(self) -> None:
        servicer = self.servicer
        for name, cond in self.conditions.items():
            servicer.details[name] = cond.detail
            await servicer.set(name, SERVING if cond.level is Level.OK else NOT_SERVING)
        status = SERVING if self.overall_serving() else NOT_SERVING
        down = [
            f"{name}: {cond.detail}"
            for name, cond in sorted(self.conditions.items())
            if name in self._essential and cond.level is Level.DOWN
        ]
        for service in SERVICES:
            servicer.details[service] = "; ".join(down)
            await servicer.set(service, status)

    async def refresh(self) -> None:
        """Run every check once."""
        for check in self._checks:
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for swallows a cancel that
                # arrives as the check finishes, and stop() would then wait forever.
                async with asyncio.timeout(CHECK_TIMEOUT_S):
                    level, detail = await check.run()
            except TimeoutError:
                level, detail = Level.DOWN, f"the check did not finish within {CHECK_TIMEOUT_S} s"
            except Exception as exc:  # noqa: BLE001 - a failing check is a DOWN component
                level, detail = Level.DOWN, f"the check failed: {exc}"
            await self.report(check.name, level, detail)

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.refresh()

    async def shutdown(self) -> None:
        self._shutting_down = True
        await self.servicer.enter_graceful_shutdown()


# -- the local components --------------------------------------------------------------


class DiskCheck:
    """The durable tier: its directory takes a small write (fsync'd when the manager fsyncs)
    and the filesystem has at least `min_free_bytes` free.

    A failed write is DOWN (no window can be frozen); too little free space is DEGRADED (the
    manager serves, but the next large freeze may fail with RESOURCE_EXHAUSTED or worse)."""

    name = "cwm.tier.disk"
    essential = True

    def __init__(self, root: Path, min_free_bytes: int, fsync: bool) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self.fsync = fsync
        self._probe = root / f"{PROBE_PREFIX}{os.getpid()}{PROBE_SUFFIX}"
        with contextlib.suppress(OSError):
            for stale in root.glob(f"{PROBE_PREFIX}*{PROBE_SUFFIX}"):
                stale.unlink(missing_ok=True)

    async def run(self) -> tuple[Level, str]:
        # A thread of its own: the manager's I/O threads may be busy with a large freeze,
        # and a probe queued behind it would read as a dead disk.
        return await asyncio.to_thread(self._probe_once)

    def _probe_once(self) -> tuple[Level, str]:
        try:
            fd = os.open(self._probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"cwm health probe\n")
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.unlink(self._probe)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(self._probe)
            return Level.DOWN, f"cannot write under {self.root}: {exc.strerror or exc}"
        stat = os.statvfs(self.root)
        free = stat.f_bavail * stat.f_frsize
        if free < self.min_free_bytes:
            return (
                Level.DEGRADED,
                f"{free >> 20} MiB free under {self.root}, below min_free_mib "
                f"{self.min_free_bytes >> 20}",
            )
        return Level.OK, f"{free >> 20} MiB free"


class CatalogCheck:
    """The SQLite catalog answers a read on its own thread."""

    name = "cwm.catalog"
    essential = True

    def __init__(self, manager: WindowManager) -> None:
        self._manager = manager

    async def run(self) -> tuple[Level, str]:
        manager = self._manager
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S / 2):
                await manager.db(manager.catalog.window_exists, "", "")
        except TimeoutError:
            return Level.DOWN, f"the catalog did not answer within {CHECK_TIMEOUT_S / 2:.0f} s"
        except Exception as exc:  # noqa: BLE001
            return Level.DOWN, f"the catalog failed a read: {exc}"
        return Level.OK, ""


class MemoryCheck:
    """The hot tier cannot fail; it reports what it holds (and is not essential)."""

    name = "cwm.tier.memory"
    essential = False

    def __init__(self, manager: WindowManager) -> None:
        self._manager = manager

    async def run(self) -> tuple[Level, str]:
        memory = self._manager.memory
        return Level.OK, f"{memory.held_bytes >> 20} of {memory.capacity_bytes >> 20} MiB held"


class BulkCheck:
    """The bulk channel's endpoints (`cwm_server.manager.bulk`), so `cwm status` shows where
    transfers can go beside gRPC. Not essential: without it transfers go over gRPC."""

    name = "cwm.bulk"
    essential = False

    def __init__(self, describe: Callable[[], str]) -> None:
        self._describe = describe

    async def run(self) -> tuple[Level, str]:
        return Level.OK, self._describe()


# -- Redis (cwm_server.manager.tiers.redis, catalog.redis) ----------------------------------

REDIS_COMPONENT = "cwm.tier.redis"


class RedisCheck:
    """The Redis tier (and, in fleet mode, the shared catalog): a PING past the link's
    breaker. Not essential: a manager whose Redis is gone is DEGRADED, serves what its
    memory and disk hold, answers what needs Redis with UNAVAILABLE at once, and is OK
    again by itself at the first check that reaches Redis. It only reports: the sweeps
    that finish collections Redis's absence left run from housekeeping (`sweeper`), which
    hears from the link when this ping finds Redis back."""

    name = REDIS_COMPONENT
    essential = False

    def __init__(self, manager: WindowManager) -> None:
        self._manager = manager
        self._epoch: str | None = None
        """The fleet's epoch marker as this manager first read it (fleet mode)."""
        self._reset_seen = ""
        """When a reset of the shared catalog was first noticed ("" if never): reported
        until this manager restarts, so nobody misses it between two checks."""

    def _check_epoch(self) -> str:
        """In fleet mode, compare the epoch marker with the one this manager started with:
        a Redis that lost its data (restarted without persistence, flushed) has none, and
        the catalog it serves is not the fleet's. A new marker is set at once, so every
        manager of the fleet sees the reset too. Returns a reset's description, or ""."""
        link = self._manager.redis
        assert link is not None
        key = f"{self._manager.config.redis_prefix}:epoch"

        def read_or_start(client: Any) -> str:
            # Read first: a full Redis (maxmemory, noeviction) refuses every SET, even one
            # that NX would make a no-op, and the check must still see the marker there.
            value = client.get(key)
            if value is None:
                client.set(key, secrets.token_hex(8), nx=True)
                value = client.get(key)
            return value.decode() if isinstance(value, bytes) else str(value)

        epoch = link.call(read_or_start, "the fleet's epoch marker")
        if self._epoch is None:
            self._epoch = epoch
        elif epoch != self._epoch and not self._reset_seen:
            self._reset_seen = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            log.error(
                "shared_catalog_reset",
                where=link.where,
                was=self._epoch,
                now=epoch,
                why="Redis lost its data (restarted without persistence, or flushed)",
            )
        return self._reset_seen

    async def run(self) -> tuple[Level, str]:
        manager = self._manager
        link = manager.redis
        assert link is not None
        ok, detail = await asyncio.to_thread(link.ping)
        shared = manager.config.redis_catalog
        if ok and shared:
            try:
                reset = await asyncio.to_thread(self._check_epoch)
            except ResourceExhausted:
                pass  # Redis answers but refuses writes: reported below as a refusal
            except CwmError as exc:
                ok, detail = False, exc.message
            else:
                if reset:
                    return (
                        Level.DEGRADED,
                        f"the shared catalog in Redis ({link.where}) was reset at {reset}: "
                        "Redis came back without the fleet's data (no persistence, or "
                        "flushed), so windows frozen before are gone from the catalog; "
                        "restore them from exports (`cwm import`), and give Redis "
                        "persistence (appendonly yes). Restart this manager to clear this",
                    )
        if not ok:
            needs = "the shared catalog and " if shared else ""
            return (
                Level.DEGRADED,
                f"Redis ({link.where}) is unreachable ({detail}); serving what the local tiers "
                f"hold, {needs}chunks only in Redis answer UNAVAILABLE",
            )
        refused = link.recent_refusal()
        if refused is not None:
            reason, words = refused
            copies = (
                "freezes that need Redis are refused until it takes writes again"
                if shared or manager.store.redis_required
                else "new chunks are kept on disk only (their Redis copy is skipped)"
            )
            return (
                Level.DEGRADED,
                f"Redis ({link.where}) answers but refused a command lately ({reason}: {words}); "
                f"{copies}",
            )
        mode = "shared catalog, " if shared else ""
        return Level.OK, f"{link.where} ({mode}{manager.config.redis_policy})"


def catalog_checks(manager: WindowManager) -> list[Check]:
    """The catalog's check and, with a Redis tier, Redis's. With the catalog in Redis the
    local SQLite check has nothing to check: Redis's check stands for both."""
    checks: list[Check] = []
    if not manager.config.redis_catalog:
        checks.append(CatalogCheck(manager))
    if manager.redis is not None:
        checks.append(RedisCheck(manager))
    return checks


def watch_redis(board: HealthBoard, manager: WindowManager) -> None:
    """Report Redis's condition the moment a call finds it gone or back, not only at the
    next periodic check (the link calls this from I/O threads)."""
    link = manager.redis
    if link is None:
        return
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Future[None]] = set()

    def changed(up: bool, detail: str) -> None:
        level = Level.OK if up else Level.DEGRADED
        text = "reachable again" if up else f"Redis ({link.where}) is unreachable ({detail})"

        def report() -> None:
            task = asyncio.ensure_future(board.report(REDIS_COMPONENT, level, text))
            pending.add(task)
            task.add_done_callback(pending.discard)

        loop.call_soon_threadsafe(report)

    link.listeners.append(changed)
