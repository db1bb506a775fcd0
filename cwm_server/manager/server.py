"""Build and run the manager's grpc.aio server."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import socket
import uuid
from pathlib import Path

import grpc.aio
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cwm_client import pb
from cwm_client.allocator import tune_allocator, use_one_malloc_arena
from cwm_client.channels import MAX_MESSAGE_BYTES
from cwm_server.manager import health
from cwm_server.manager.agents import AgentRegistry
from cwm_server.manager.bulk.channel import BulkChannel
from cwm_server.manager.config import ManagerConfig, ServerOptions
from cwm_server.manager.housekeeping.scrub import Scrubber
from cwm_server.manager.housekeeping.sweeper import Sweeper
from cwm_server.manager.housekeeping.ttl import TtlCollector
from cwm_server.manager.metrics import ManagerMetrics, StateCollector
from cwm_server.manager.rpc.auth import Authenticator
from cwm_server.manager.rpc.interceptors.interceptor import RpcInterceptor
from cwm_server.manager.rpc.keyed_servicer import KeyedChunkServicer
from cwm_server.manager.rpc.session_servicer import SessionServicer
from cwm_server.manager.rpc.transport_security import server_credentials, warn_if_exposed
from cwm_server.manager.rpc.window_servicer import WindowServicer
from cwm_server.manager.windows.manager import WindowManager

log = structlog.get_logger("cwm.server")

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


SERVICE_NAMES = (
    pb.FreezeRequest.DESCRIPTOR.file.services_by_name["WindowService"].full_name,
    pb.ConnectRequest.DESCRIPTOR.file.services_by_name["SessionService"].full_name,
    pb.PutKeyedChunksRequest.DESCRIPTOR.file.services_by_name["KeyedChunkService"].full_name,
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.SERVICE_NAME,
)
"""What server reflection lists: cwm's three services, health, and reflection itself."""


class ManagerServer:
    """A started manager: the domain object plus the gRPC server bound to a port."""

    def __init__(self, config: ManagerConfig, options: ServerOptions | None = None) -> None:
        self.config = config
        self.options = options or ServerOptions()
        self.manager = WindowManager(config)
        self.agents = AgentRegistry()
        self.manager_id = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.server: grpc.aio.Server | None = None
        self._lock_fd: int | None = None
        self.port = 0
        self.metrics = ManagerMetrics()
        self.manager.store.observer = self.metrics.store
        self.health_servicer = health.CwmHealthServicer()
        self.health = health.HealthBoard(
            self.health_servicer,
            [
                health.DiskCheck(self.manager.disk.root, self.options.min_free_bytes, config.fsync),
                *health.catalog_checks(self.manager),
                health.MemoryCheck(self.manager),
                health.BulkCheck(lambda: self.bulk.describe()),  # opened in start()
            ],
            interval_s=self.options.health_interval_s,
        )
        self.metrics.add_state(
            StateCollector(
                config.data_dir / "catalog.sqlite",
                self.manager.memory,
                agent_count=self.agents.count,
                health_levels=lambda: [
                    (name, int(cond.level)) for name, cond in self.health.conditions.items()
                ],
            )
        )
        self._health_task: asyncio.Task[None] | None = None
        self.ttl_collector = TtlCollector(self.manager.expiry, config.ttl_interval_s)
        """Deletes expired windows every `config.ttl_interval_s` seconds."""
        self.scrubber = Scrubber(
            self.manager.store,
            self.manager.disk,
            self.manager.io,
            config.scrub_interval_s if self.manager.store.disk_enabled else 0.0,
            config.scrub_mib_per_s,
        )
        """Verifies every chunk file every `config.scrub_interval_s` seconds (0: never)."""
        self.sweeper = Sweeper(self.manager.collector.sweeps(), self.manager.redis)
        """Finishes collections that Redis trouble or a crash left, each on its schedule."""
        self.bulk = BulkChannel(self.manager, self.options, self.metrics.bulk)
        """The bulk endpoints beside the gRPC port (opened by `start`)."""

    @property
    def metrics_port(self) -> int:
        return self.metrics.port

    async def start(self) -> int:
        """Lock the data dir, recover what a crash left, then bind and serve."""
        self._lock_data_dir()
        self.manager.recover()
        await self.health.refresh()
        health.watch_redis(self.health, self.manager)
        auth = (
            Authenticator.from_file(
                self.options.auth_file, certificates=self.options.tls_client_ca is not None
            )
            if self.options.auth_enabled
            else None
        )
        # One interceptor runs every call through request context, metrics, error mapping,
        # authentication and request parsing, in that order (rpc/interceptors/).
        self.server = grpc.aio.server(
            interceptors=[RpcInterceptor(self.metrics.rpc, auth)], options=SERVER_OPTIONS
        )
        pb.add_WindowServiceServicer_to_server(WindowServicer(self.manager, self.bulk), self.server)
        pb.add_SessionServiceServicer_to_server(
            SessionServicer(self.manager, self.agents, self.manager_id), self.server
        )
        pb.add_KeyedChunkServiceServicer_to_server(
            KeyedChunkServicer(self.manager, self.bulk), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health_servicer, self.server)
        reflection.enable_server_reflection(SERVICE_NAMES, self.server)
        credentials = server_credentials(self.options)
        if problem := listen_problem(self.config.listen):
            raise OSError(problem)  # before grpc tries: its own error names no cause
        if credentials is None:
            self.port = self.server.add_insecure_port(self.config.listen)
        else:
            self.port = self.server.add_secure_port(self.config.listen, credentials)
        if self.port == 0:
            raise OSError(f"could not listen on {self.config.listen}")
        if self.options.metrics_listen:
            self.metrics.serve(self.options.metrics_listen)
        self.bulk.start(self.config.listen, self.port)
        bulk = health.BulkCheck(self.bulk.describe)
        await self.health.report(bulk.name, *await bulk.run(), essential=bulk.essential)
        await self.server.start()
        self._health_task = asyncio.ensure_future(self.health.run_forever())
        self.ttl_collector.start()
        self.scrubber.start()
        self.sweeper.start()
        host = self.config.listen.rsplit(":", 1)[0]
        warn_if_exposed(host, self.options, credentials is not None)
        log.info(
            "serving",
            address=f"{host}:{self.port}",
            bulk_tcp=self.bulk.tcp_address or None,
            bulk_unix=self.bulk.unix_path or None,
            data_dir=str(self.config.data_dir),
            metrics=(
                f"http://{self.options.metrics_listen.rsplit(':', 1)[0]}:{self.metrics.port}"
                "/metrics"
                if self.options.metrics_listen
                else None
            ),
        )
        return self.port

    async def stop(self, grace: float | None = 2.0) -> None:
        await self.ttl_collector.stop()
        await self.scrubber.stop()
        await self.sweeper.stop()
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        await self.health.shutdown()
        if self.server is not None:
            await self.server.stop(grace)
        await self.bulk.close()
        self.metrics.close()
        self.manager.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _lock_data_dir(self) -> None:
        """One manager per data dir: a second one would collect the first one's in-flight
        chunk files as orphans at start-up. The kernel drops the lock if we are killed."""
        path = self.config.data_dir / "manager.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OSError(
                f"another manager is using {self.config.data_dir}; stop it or pick another "
                "--data-dir"
            ) from None
        self._lock_fd = fd


def listen_problem(listen: str) -> str:
    """Why `--listen` HOST:PORT cannot be bound ("" if it can, or the port is 0)."""
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        return f"--listen expects HOST:PORT with a port from 0 to 65535, got {listen!r}"
    port = int(port_text)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        return f"could not listen on {listen}: {host!r} is not an address of this host ({exc})"
    if port == 0:
        return ""
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return (
                f"could not listen on {listen}: {exc.strerror or exc}; pick another with "
                "--listen HOST:PORT"
            )
    return ""


class StartupError(Exception):
    """The manager could not start; the message says why in one line, naming the option to
    change (`cwm serve` prints it and exits 2)."""


def startup_problem(exc: BaseException, config: ManagerConfig) -> str:
    """One line for a start-up failure (grpc's own bind error names neither cause nor fix)."""
    data_dir = config.data_dir
    not_a_directory = data_dir.exists() and not data_dir.is_dir()
    if isinstance(exc, FileExistsError | NotADirectoryError) and not_a_directory:
        return f"--data-dir {data_dir} is not a directory; pick a directory for the store"
    if isinstance(exc, PermissionError):
        where = exc.filename or data_dir
        return f"permission denied on {where}; run as a user who may write --data-dir {data_dir}"
    if isinstance(exc, RuntimeError) and "Failed to bind" in str(exc):
        return (
            f"could not listen on {config.listen}: the port is taken or the address is not "
            "one of this host's; pick another with --listen HOST:PORT"
        )
    return str(exc)


async def serve(
    config: ManagerConfig, port_file: Path | None = None, options: ServerOptions | None = None
) -> None:
    """Run until SIGINT/SIGTERM; write the bound port to `port_file` once serving."""
    use_one_malloc_arena()
    tune_allocator()
    if problem := listen_problem(config.listen):  # before anything is made in the data dir
        raise StartupError(problem)
    try:
        server = ManagerServer(config, options)
        port = await server.start()
    except (OSError, RuntimeError) as exc:
        raise StartupError(startup_problem(exc, config)) from exc
    if port_file is not None:
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.replace(port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await server.stop()
