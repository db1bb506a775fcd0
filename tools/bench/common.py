"""Shared pieces of the benchmark scripts: the machine, a `cwm serve` subprocess with RSS
sampling, timing helpers and where results are recorded."""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
BENCH_DIR = DOCS / "bench"
MiB = 1 << 20


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return (
        f"{platform.node()} ({os.cpu_count()} cores {cpu}, {mem_gib:.0f} GiB RAM, "
        f"{platform.machine()}, Linux {platform.release()}, Python {platform.python_version()})"
    )


def load_average() -> float:
    return os.getloadavg()[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


@dataclass
class Timing:
    """Repeated runs of one measure: seconds per run, MiB moved per run."""

    mib: float
    seconds: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def mib_s(self) -> float:
        """Throughput of the median run."""
        return self.mib / self.median_s if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "mib": self.mib,
            "seconds": [round(s, 6) for s in self.seconds],
            "median_s": round(self.median_s, 6),
            "mib_s": round(self.mib_s, 1),
            **self.extra,
        }


def timed(fn: Callable[[], object], mib: float, repeat: int) -> Timing:
    timing = Timing(mib)
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        timing.seconds.append(time.perf_counter() - started)
    return timing


class RssSampler:
    """Samples a process's RSS every 20 ms in a thread while the block runs."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._stop = threading.Event()
        self.peak = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.peak = max(self.peak, status_kib(self._pid, "VmRSS") * 1024)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()


def status_kib(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


class ManagerProcess:
    """`cwm serve` as a subprocess on an ephemeral loopback port."""

    def __init__(self, data_dir: Path, args: Sequence[str] = ()) -> None:
        self.data_dir = data_dir
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.target = ""
        self.log = data_dir.parent / f"{data_dir.name}.log"

    def start(self) -> ManagerProcess:
        port_file = self.data_dir.parent / f"{self.data_dir.name}.port"
        port_file.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
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
                    "--log-level",
                    "WARNING",
                    *self.args,
                ],
                cwd=ROOT,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"manager failed to start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        self.target = f"127.0.0.1:{port_file.read_text().strip()}"
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        return status_kib(self.pid, "VmRSS") * 1024

    def peak_rss(self) -> int:
        return status_kib(self.pid, "VmHWM") * 1024

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> ManagerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextlib.contextmanager
def py_spy(pid: int, out: str, *extra: str) -> Iterator[None]:
    """With $SPY set, py-spy records `pid`'s raw stacks (every thread, 200 Hz) into `out`
    for the block; otherwise nothing happens."""
    if not os.environ.get("SPY"):
        yield
        return
    spy = subprocess.Popen(
        [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid), "-o", out,
         "-f", "raw", "-r", "200", "--threads", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(1)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait()
