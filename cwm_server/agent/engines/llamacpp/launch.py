"""Start an unmodified llama-server as a child process, as docs/LLAMACPP.md starts one.

Used by the tests, the TTFT benchmark and anyone scripting a local setup: the model, a port on
127.0.0.1, `--slot-save-path` (the directory the agent shares), the slot count and context,
flash attention on or off (which decides whether V is stored transposed), no web UI and no
host-memory prompt cache (`--cache-ram 0`), so a slot's KV lives only in the slot.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

DEFAULT_SERVER = Path.home() / ".cache" / "cwm" / "llama.cpp-0.3.36" / "bin" / "llama-server"
"""Where `make llamacpp` installs the server (CWM_LLAMA_SERVER overrides)."""


def server_binary() -> Path:
    return Path(os.environ.get("CWM_LLAMA_SERVER") or DEFAULT_SERVER)


def server_command(
    model: str | os.PathLike[str],
    port: int,
    slot_dir: str | os.PathLike[str],
    *,
    binary: str | os.PathLike[str] | None = None,
    slots: int = 2,
    ctx_per_slot: int = 4096,
    flash_attn: bool = True,
    threads: int | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    command = [
        str(binary or server_binary()),
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--slot-save-path",
        str(slot_dir).rstrip("/") + "/",
        "--parallel",
        str(slots),
        "--ctx-size",
        str(slots * ctx_per_slot),
        "--flash-attn",
        "on" if flash_attn else "off",
        "--no-webui",
        "--cache-ram",
        "0",
    ]
    if threads:
        command += ["--threads", str(threads), "--threads-batch", str(threads)]
    return command + list(extra or [])


class LlamaServer:
    """One llama-server process (stop() ends it, SIGKILL if it will not go)."""

    def __init__(
        self,
        model: str | os.PathLike[str],
        port: int,
        slot_dir: Path,
        log_path: Path,
        cpu: str | None = None,
        **options: Any,
    ) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.slot_dir = slot_dir
        self.log_path = log_path
        self.command = server_command(model, port, slot_dir, **options)
        if cpu is not None:
            self.command = ["taskset", "-c", cpu, *self.command]
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def agent_args(self, agent_id: str, manager: str) -> list[str]:
        """`cwm` arguments that start an agent beside this server, dialled to `manager`."""
        return [
            "agent",
            "--engine",
            "llama-server",
            "--llama-url",
            self.url,
            "--slot-dir",
            str(self.slot_dir),
            "--agent-id",
            agent_id,
            "--manager",
            manager,
        ]

    def launch(self) -> None:
        self.slot_dir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"llama-server exited with {self.process.returncode}; see {self.log_path}:\n"
                    + self.log_path.read_text(errors="replace")[-2000:]
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"llama-server on port {self.port} not ready in {timeout:.0f} s")

    def __enter__(self) -> LlamaServer:
        self.launch()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def completion(
    url: str,
    prompt: list[int],
    slot: int,
    *,
    n_predict: int = 16,
    n_probs: int = 0,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """A greedy `/completion` in slot `slot` reusing its cached prefix; with `n_probs`, each
    generated token's top candidates and their probabilities."""
    body = {
        "prompt": prompt,
        "n_predict": n_predict,
        "id_slot": slot,
        "cache_prompt": True,
        "temperature": 0,
        "n_probs": n_probs,
        "return_tokens": True,
    }
    request = urllib.request.Request(
        f"{url}/completion",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        answer: dict[str, Any] = json.loads(reply.read())
    return answer
