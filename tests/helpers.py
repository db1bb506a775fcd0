"""Test helpers: real managers (in a thread or as a subprocess) and synthetic KV chunks."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from cwm_client import InMemoryChunk, chunks_from_bytes, pb
from cwm_client.chunks import bytes_per_token
from cwm_server.manager.config import ManagerConfig, ServerOptions
from cwm_server.manager.server import ManagerServer

ROOT = Path(__file__).resolve().parent.parent

# K+V x 4 layers x 2 KV heads x 64 dim x 2 bytes (bf16) = 2 KiB per token, 512 KiB per chunk.
FINGERPRINT = pb.ModelFingerprint(
    model_id="synthetic-tiny",
    weights_digest="0" * 64,
    tokenizer_digest="1" * 64,
    kv_dtype=pb.KvDtype.KV_DTYPE_BFLOAT16,
    num_layers=4,
    num_kv_heads=2,
    head_dim=64,
    engine_name="synthetic",
    engine_version="0",
    block_size=16,
)

# K+V x 4 layers x 4 KV heads x 64 dim x 2 bytes = 4 KiB per token, 1 MiB per chunk.
FINGERPRINT_1MIB = pb.ModelFingerprint(
    model_id="synthetic-1mib",
    kv_dtype=pb.KvDtype.KV_DTYPE_BFLOAT16,
    num_layers=4,
    num_kv_heads=4,
    head_dim=64,
    engine_name="synthetic",
    block_size=16,
)


def synthetic_chunks(
    tokens: int,
    fingerprint: pb.ModelFingerprint = FINGERPRINT,
    chunk_tokens: int = 256,
    seed: int = 0,
) -> list[InMemoryChunk]:
    """Random bf16-like KV for `tokens` tokens, cut into canonical chunks."""
    per_token = bytes_per_token(fingerprint)
    rng = np.random.default_rng(seed)
    pieces = []
    for start in range(0, tokens, chunk_tokens):
        count = min(chunk_tokens, tokens - start)
        pieces.append(rng.integers(0, 256, size=per_token * count, dtype=np.uint8).tobytes())
    return chunks_from_bytes(pieces, chunk_tokens, tokens)


def staging_header(
    name: str, chunks: Sequence[InMemoryChunk], ids: Sequence[int], upload_id: str
) -> pb.FreezeHeader:
    """The header of a stage_only share of upload `upload_id` (what OfferBulkFreeze takes),
    for `chunks` of 256 tokens with FINGERPRINT."""
    return pb.FreezeHeader(
        name=name,
        fingerprint=FINGERPRINT,
        token_ids=ids,
        chunk_tokens=256,
        chunk_digests=[c.digest for c in chunks],
        upload_id=upload_id,
        stage_only=True,
    )


def token_ids(tokens: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 32000, size=tokens)]


class ThreadedManager:
    """An in-process manager on 127.0.0.1:<ephemeral> with its own event loop thread, so
    tests can use the blocking client directly."""

    def __init__(self, config: ManagerConfig, options: ServerOptions | None = None) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ManagerServer(config, options)
        self.port = self._run(self.server.start())
        self.target = f"127.0.0.1:{self.port}"

    def _run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def stop(self) -> None:
        self._run(self.server.stop(grace=0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    @property
    def manager(self):  # type: ignore[no-untyped-def]
        return self.server.manager


class ManagerProcess:
    """`cwm serve` as a real subprocess: for restarts, SIGKILL and RSS measurements."""

    def __init__(self, data_dir: Path, extra_args: Sequence[str] = ()) -> None:
        self.data_dir = data_dir
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log_path = data_dir.parent / f"{data_dir.name}-manager.log"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ManagerProcess:
        port_file = self.data_dir.parent / f"{self.data_dir.name}.port"
        port_file.unlink(missing_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cwm_server.cli.main",
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--listen",
                "127.0.0.1:0",
                "--port-file",
                str(port_file),
                *self.extra_args,
            ],
            stdout=log,
            stderr=log,
            cwd=ROOT,
        )
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"manager exited: {self.log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError("manager did not start")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill(signal.SIGTERM)

    def _status_kib(self, field: str) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def rss_bytes(self) -> int:
        return self._status_kib("VmRSS") * 1024

    def peak_rss_bytes(self) -> int:
        return self._status_kib("VmHWM") * 1024


def chunk_files(data_dir: Path) -> list[Path]:
    """Chunk files under a data dir (not the disk health check's short-lived probe file)."""
    root = data_dir / "chunks"
    if not root.exists():
        return []
    return sorted(
        p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".health-probe")
    )


def env_with_pythonpath() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class ThreadedAgent:
    """A HostAgent on its own event-loop thread, as it runs beside an engine."""

    def __init__(self, agent: object) -> None:
        from cwm_server.agent.host_agent import HostAgent

        assert isinstance(agent, HostAgent)
        self.agent = agent
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._stop = asyncio.run_coroutine_threadsafe(self._make_event(), self.loop).result()
        self._task = asyncio.run_coroutine_threadsafe(agent.run(self._stop), self.loop)

    async def _make_event(self) -> asyncio.Event:
        return asyncio.Event()

    def wait_connected(self, timeout: float = 30.0) -> None:
        async def wait() -> None:
            await asyncio.wait_for(self.agent.connected.wait(), timeout)

        asyncio.run_coroutine_threadsafe(wait(), self.loop).result(timeout + 1)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._task.result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def eventually(condition: Callable[[], object], timeout: float = 20.0) -> bool:
    """Poll `condition` until it holds or `timeout` passes; whether it held (tests assert
    it, so a failure shows the condition; tests.ops_helpers.wait_for raises instead)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return bool(condition())


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def mounted_tmpfs(mount: Path, mib: int) -> Iterator[Path]:
    """A tmpfs of `mib` MiB mounted at `mount` (made if missing) for the block; the test is
    skipped where it cannot be mounted (it needs root)."""
    import pytest

    mount.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()}); needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_disk(path: Path) -> None:
    """Write `path` until its filesystem is full (as another process would)."""
    block = os.urandom(1 << 20)
    with open(path, "wb") as out:
        with contextlib.suppress(OSError):
            while True:
                out.write(block)
                out.flush()
        # the last partial blocks, byte-sized pieces until nothing fits
        for size in (1 << 16, 1 << 12, 1 << 8, 1):
            try:
                while True:
                    os.write(out.fileno(), block[:size])
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
