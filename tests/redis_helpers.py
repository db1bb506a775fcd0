"""Real Redis for the tests: `redis-server` processes on free loopback ports (never the
system Redis on 6379, never a fake), a 3-master Redis Cluster made with
`redis-cli --cluster create`, and in-process managers pointed at them."""

from __future__ import annotations

import asyncio
import faulthandler
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis

from cwm_client import pb
from cwm_server.manager.config import ManagerConfig, ServerOptions
from cwm_server.manager.server import ManagerServer
from tests.helpers import ThreadedManager, free_port

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")

needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None or REDIS_CLI is None, reason="redis-server/redis-cli not installed"
)


class RedisServer:
    """One `redis-server` on 127.0.0.1:<free port>, its files under `directory`.

    `persist`: append-only file fsync'd on every write, so a SIGKILL loses nothing and a
    restart on the same port and directory brings the data back."""

    def __init__(
        self, directory: Path, *, persist: bool = False, cluster: bool = False, port: int = 0
    ) -> None:
        self.directory = directory
        self.persist = persist
        self.cluster = cluster
        self.port = port or (cluster_port() if cluster else free_port())
        self.proc: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> RedisServer:
        assert REDIS_SERVER is not None
        args = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--appendonly",
            "yes" if self.persist else "no",
            "--appendfsync",
            "always",
        ]
        if self.cluster:
            args += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{self.port}.conf",
                "--cluster-node-timeout",
                "2000",
            ]
        log = open(self.directory / f"redis-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, cwd=self.directory)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on {self.port} exited: {self.log_tail()}")
            try:
                if self.client().ping():
                    return self
            except redis.exceptions.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server on {self.port} did not answer")
            time.sleep(0.05)

    def log_tail(self) -> str:
        path = self.directory / f"redis-{self.port}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


class RedisClusterProcs:
    """Three masters, no replicas, every slot assigned, `cluster_state:ok` on each."""

    def __init__(self, directory: Path, masters: int = 3, persist: bool = False) -> None:
        self.nodes = [
            RedisServer(directory / f"node{i}", cluster=True, persist=persist)
            for i in range(masters)
        ]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self, timeout: float = 30.0) -> RedisClusterProcs:
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> RedisClusterProcs:
        for node in self.nodes:
            node.start()
        assert REDIS_CLI is not None
        created = subprocess.run(
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *[f"127.0.0.1:{node.port}" for node in self.nodes],
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout}")
        deadline = time.monotonic() + timeout
        while not all(_cluster_ok(node) for node in self.nodes):
            if time.monotonic() > deadline:
                raise TimeoutError("the cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def keys_per_node(self, pattern: str) -> list[int]:
        return [
            sum(1 for _ in node.client().scan_iter(match=pattern, count=1000))
            for node in self.nodes
        ]


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free port P with P + 10000 free too (the cluster bus), P <= 55535."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 55535)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _cluster_ok(node: RedisServer) -> bool:
    info = node.client().execute_command("CLUSTER INFO")
    if isinstance(info, dict):
        return str(info.get("cluster_state")) == "ok"
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text


class RedisManager(ThreadedManager):
    """A ThreadedManager with ServerOptions (fast health checks) and a Redis config."""

    def __init__(self, config: ManagerConfig, options: ServerOptions | None = None) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ManagerServer(config, options or ServerOptions(health_interval_s=0.1))
        self.port = self._run(self.server.start())
        self.target = f"127.0.0.1:{self.port}"

    def _run(self, coro):  # type: ignore[no-untyped-def]
        """As ThreadedManager's, but a start or stop that hangs dumps every thread's stack
        (seen once on a heavily loaded machine: a 60 s timeout with no trace)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout=60)
        except TimeoutError:
            faulthandler.dump_traceback(all_threads=True)
            raise


def redis_config(data_dir: Path, urls: list[str] | str, **overrides: Any) -> ManagerConfig:
    """A manager in fleet mode (shared catalog, write-through) on `urls`."""
    url = urls if isinstance(urls, str) else ",".join(urls)
    base = ManagerConfig(
        data_dir=data_dir,
        listen="127.0.0.1:0",
        redis_url=url,
        redis_catalog=True,
        redis_cluster=not isinstance(urls, str),
    )
    return replace(base, **overrides)


def catalog_audit(client: Any, prefix: str = "cwm", tenant: str = "default") -> dict[str, Any]:
    """Read a tenant's shared catalog and its chunk keys straight from Redis (a client of
    redis.Redis or RedisCluster) and compute what the refcounts must be."""
    base = f"{prefix}:cat:{{{tenant}}}"
    windows = client.hgetall(f"{base}:windows")
    expected: Counter[bytes] = Counter()
    for blob in windows.values():
        info = pb.WindowInfo.FromString(blob)
        expected.update(ref.digest for ref in info.chunks)
    refs = {bytes(d): int(n) for d, n in client.hgetall(f"{base}:refs").items()}
    meta = set(client.hkeys(f"{base}:meta"))
    dying = client.hgetall(f"{base}:dying")
    chunk_keys = set()
    for key in client.scan_iter(match=f"{prefix}:chunk:*", count=1000):
        text = key.decode()
        owner, _, hexd = text[text.index("{") + 1 : text.rindex("}")].rpartition(":")
        if owner == tenant:
            chunk_keys.add(bytes.fromhex(hexd))
    info_keys = set()
    for key in client.scan_iter(match=f"{prefix}:chunkinfo:*", count=1000):
        text = key.decode()
        owner, _, hexd = text[text.index("{") + 1 : text.rindex("}")].rpartition(":")
        if owner == tenant:
            info_keys.add(bytes.fromhex(hexd))
    return {
        "info_keys": info_keys,
        "windows": {k.decode() for k in windows},
        "expected": dict(expected),
        "refs": refs,
        "meta": {bytes(m) for m in meta},
        "dying": dying,
        "chunk_keys": chunk_keys,
    }


def thawed(client: Any, name: str) -> list[bytes]:
    """Every chunk of window `name`, verified, over one stream."""
    with client.thaw(name, streams=1) as stream:
        return [bytes(c.data) for c in stream]
