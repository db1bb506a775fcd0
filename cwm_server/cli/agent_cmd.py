"""`cwm agent`: a host agent beside an engine, dialled into the manager."""

from __future__ import annotations

import argparse
import asyncio
import signal

from cwm_client.errors import CwmError
from cwm_server.agent.engines.base import EngineAdapter, EngineSettings, EngineSettingsError
from cwm_server.agent.engines.factory import create_engine, engine_names
from cwm_server.cli.options import Subparsers, add_command, client_credentials
from cwm_server.logs import configure_logging
from cwm_server.manager.config import default_data_dir


def _engine(args: argparse.Namespace) -> EngineAdapter:
    """The engine `--engine` names, built by the factory (which imports only that one)."""
    host, _, port = args.http.rpartition(":")
    settings = EngineSettings(
        model=args.model,
        http_host=host or "127.0.0.1",
        http_port=int(port),
        vllm_url=args.vllm_url,
        vllm_dir=args.vllm_dir,
        vllm_keep_seconds=args.vllm_keep_seconds,
        vllm_keep_mib=args.vllm_keep_mib,
        vllm_pool_mib=args.vllm_pool_mib,
        llama_url=args.llama_url,
        slot_dir=args.slot_dir,
        models_dir=default_data_dir() / "models",
    )
    try:
        return create_engine(args.engine, settings)
    except EngineSettingsError as exc:
        raise SystemExit(str(exc)) from None
    except CwmError as exc:  # the engine is unreachable or refuses (named in the message)
        raise SystemExit(f"cwm agent: {exc}") from None


def cmd_agent(args: argparse.Namespace) -> int:
    configure_logging("json", args.log_level)
    from cwm_server.agent.auto_freeze import AutoFreezePolicy
    from cwm_server.agent.host_agent import HostAgent

    engine = _engine(args)
    agent = HostAgent(
        engine,
        args.manager,
        args.agent_id,
        chunk_tokens=args.chunk_tokens,
        policy=AutoFreezePolicy(tokens=args.auto_freeze_tokens, idle_seconds=args.auto_freeze_idle),
        credentials=client_credentials(args),
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await agent.run(stop)

    try:
        asyncio.run(run())
    finally:
        engine.close()
    return 0


def add_parser(sub: Subparsers) -> None:
    agent = add_command(sub, "agent", help="run a host agent beside an engine")
    agent.add_argument(
        "--engine",
        choices=engine_names(),
        default="reference",
        help="reference: HF transformers in this process; vllm: a vLLM server with the cwm "
        "connector (--vllm-url, --vllm-dir); llama-server: an unmodified llama-server's slots "
        "(--llama-url, --slot-dir); llamacpp: llama.cpp in this process (--model FILE.gguf)",
    )
    agent.add_argument(
        "--model",
        default=None,
        help="local HF model directory, or 'tiny' (built on first use; the reference "
        "engine's default); with --engine vllm, the directory of the model vLLM serves "
        "(default: the path vLLM reports); with --engine llamacpp, a GGUF file or 'tiny'; with "
        "--engine llama-server, the GGUF file the server runs (default: the path it reports)",
    )
    agent.add_argument("--llama-url", help="the llama-server, e.g. http://127.0.0.1:8080")
    agent.add_argument(
        "--slot-dir",
        help="the directory llama-server was started with as --slot-save-path",
    )
    agent.add_argument("--vllm-url", help="the vLLM server, e.g. http://127.0.0.1:8000")
    agent.add_argument(
        "--vllm-dir",
        help="the staging directory shared with the connector (its kv_connector_extra_config "
        "cwm_dir)",
    )
    agent.add_argument(
        "--vllm-keep-seconds",
        type=float,
        default=600.0,
        metavar="S",
        help="keep a thawed window staged for its session's first request for S seconds, so "
        "the blocks vLLM's prefix cache evicted by then are re-loaded, not recomputed (0: off)",
    )
    agent.add_argument(
        "--vllm-keep-mib",
        type=int,
        default=4096,
        metavar="MIB",
        help="the most staged memory kept windows hold; the oldest are released first",
    )
    agent.add_argument(
        "--vllm-pool-mib",
        type=int,
        default=2048,
        metavar="MIB",
        help="staged chunk files kept for later thaws to write over, which is several times "
        "faster than writing new ones (0: none)",
    )
    agent.add_argument("--agent-id", required=True, help="unique id of this agent")
    agent.add_argument(
        "--http", default="127.0.0.1:0", help="HOST:PORT of the engine's OpenAI-style API"
    )
    agent.add_argument(
        "--chunk-tokens",
        type=int,
        default=None,
        help="tokens per chunk (default: from the engine's KV bytes per token, chunks of up "
        "to 32 MiB in whole blocks; 256 for the reference engine)",
    )
    agent.add_argument(
        "--auto-freeze-tokens",
        type=int,
        default=0,
        metavar="N",
        help="freeze a session each time it grew by N tokens (0: off)",
    )
    agent.add_argument(
        "--auto-freeze-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="freeze a session idle this long with unfrozen tokens (0: off)",
    )
    agent.add_argument("--log-level", default="INFO")
    agent.set_defaults(handler=cmd_agent, needs_client=False)
