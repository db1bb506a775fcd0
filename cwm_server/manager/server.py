"""Build and run the manager's grpc.aio server."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import socket
import uuid
from pathlib import Path

import grpc.aio
import structlog

from cwm_client import pb
from cwm_client._common import MAX_MESSAGE_BYTES
from cwm_server.manager.agents import AgentRegistry
from cwm_server.manager.config import ManagerConfig
from cwm_server.manager.errors_interceptor import ErrorMappingInterceptor
from cwm_server.manager.malloc import use_one_malloc_arena
from cwm_server.manager.servicer import WindowServicer
from cwm_server.manager.session_servicer import SessionServicer
from cwm_server.manager.windows import WindowManager

log = structlog.get_logger("cwm.server")

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


class ManagerServer:
    """A started manager: the domain object plus the gRPC server bound to a port."""

    def __init__(self, config: ManagerConfig) -> None:
        self.config = config
        self.manager = WindowManager(config)
        self.agents = AgentRegistry()
        self.manager_id = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.server: grpc.aio.Server | None = None
        self._lock_fd: int | None = None
        self.port = 0

    async def start(self) -> int:
        """Lock the data dir, recover what a crash left, then bind and serve."""
        self._lock_data_dir()
        self.manager.recover()
        self.server = grpc.aio.server(
            interceptors=[ErrorMappingInterceptor()], options=SERVER_OPTIONS
        )
        pb.add_WindowServiceServicer_to_server(WindowServicer(self.manager), self.server)
        pb.add_SessionServiceServicer_to_server(
            SessionServicer(self.manager, self.agents, self.manager_id), self.server
        )
        self.port = self.server.add_insecure_port(self.config.listen)
        if self.port == 0:
            raise OSError(f"could not listen on {self.config.listen}")
        await self.server.start()
        host = self.config.listen.rsplit(":", 1)[0]
        log.info("serving", address=f"{host}:{self.port}", data_dir=str(self.config.data_dir))
        return self.port

    async def stop(self, grace: float | None = 2.0) -> None:
        if self.server is not None:
            await self.server.stop(grace)
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


async def serve(config: ManagerConfig, port_file: Path | None = None) -> None:
    """Run until SIGINT/SIGTERM; write the bound port to `port_file` once serving."""
    use_one_malloc_arena()
    server = ManagerServer(config)
    port = await server.start()
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
