"""The engine factory: engines found by name, imported only when asked for, and a clear
refusal for a name or a setting it does not know."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cwm_server.agent.engines.base import EngineAdapter, EngineSettings, EngineSettingsError
from cwm_server.agent.engines.factory import (
    UnknownEngine,
    adapter_class,
    create_engine,
    engine_names,
)
from cwm_server.cli.main import build_parser


def test_every_registered_engine_imports_to_an_adapter_class() -> None:
    pytest.importorskip("llama_cpp", reason="the llamacpp engine needs llama-cpp-python")
    assert engine_names() == ["llama-server", "llamacpp", "reference", "vllm"]
    for name in engine_names():
        adapter = adapter_class(name)
        assert issubclass(adapter, EngineAdapter)
        assert adapter.from_settings is not EngineAdapter.from_settings, name


def test_the_registry_names_the_adapters_the_engines_define() -> None:
    from cwm_server.agent.engines.llamacpp.server_adapter import LlamaServerAdapter
    from cwm_server.agent.engines.reference.adapter import ReferenceAdapter
    from cwm_server.agent.engines.vllm.adapter import VllmAdapter

    assert adapter_class("reference") is ReferenceAdapter
    assert adapter_class("vllm") is VllmAdapter
    assert adapter_class("llama-server") is LlamaServerAdapter


def test_an_unknown_engine_is_refused_with_the_known_names() -> None:
    with pytest.raises(
        UnknownEngine,
        match=r"unknown engine 'sglang'; known engines: llama-server, llamacpp, reference, vllm",
    ):
        create_engine("sglang", EngineSettings())


def test_choosing_an_engine_imports_only_that_engine() -> None:
    """An agent beside vLLM must start without torch: the factory imports nothing until an
    engine is chosen, and the vLLM adapter pulls in no reference-engine module."""
    probe = (
        "import sys\n"
        "from cwm_server.agent.engines import factory\n"
        "assert 'torch' not in sys.modules, 'factory imported torch'\n"
        "assert 'cwm_server.agent.engines.reference.adapter' not in sys.modules\n"
        "factory.adapter_class('vllm')\n"
        "assert 'torch' not in sys.modules, 'the vllm adapter imported torch'\n"
        "reference = 'cwm_server.agent.engines.reference'\n"
        "assert not [m for m in sys.modules if m.startswith(reference)], 'imported reference'\n"
        "factory.adapter_class('llama-server')\n"
        "assert 'torch' not in sys.modules, 'the llama-server adapter imported torch'\n"
        "assert 'llama_cpp' not in sys.modules, 'the llama-server adapter imported llama_cpp'\n"
        "factory.adapter_class('reference')\n"
        "assert 'torch' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_vllm_without_its_server_and_staging_dir_names_the_missing_options() -> None:
    with pytest.raises(EngineSettingsError, match=r"--vllm-url .* --vllm-dir"):
        create_engine("vllm", EngineSettings(vllm_url="http://127.0.0.1:8000"))
    with pytest.raises(EngineSettingsError, match=r"--vllm-url .* --vllm-dir"):
        create_engine("vllm", EngineSettings(vllm_dir="/tmp/cwm-vllm"))


def test_the_tiny_model_needs_somewhere_to_be_built() -> None:
    with pytest.raises(EngineSettingsError, match="models_dir"):
        create_engine("reference", EngineSettings(model="tiny"))


def test_the_reference_engine_builds_from_a_model_directory(tiny_model_dir: Path) -> None:
    from cwm_server.agent.engines.fingerprint import model_fingerprint

    engine = create_engine("reference", EngineSettings(model=str(tiny_model_dir)))
    try:
        assert engine.endpoint.startswith("http://127.0.0.1:")
        assert engine.fingerprint.weights_digest == model_fingerprint(tiny_model_dir).weights_digest
        assert engine.sessions() == []
    finally:
        engine.close()


def test_no_model_means_the_tiny_model_in_the_models_dir(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The reference engine's default is the built-in tiny Llama under `models_dir`, reused
    when it is already built there."""
    from cwm_server.agent.engines.fingerprint import model_fingerprint

    shutil.copytree(tiny_model_dir, tmp_path / "tiny-llama")
    engine = create_engine("reference", EngineSettings(models_dir=tmp_path))
    try:
        assert engine.fingerprint.weights_digest == model_fingerprint(tiny_model_dir).weights_digest
    finally:
        engine.close()


def test_cwm_agent_offers_exactly_the_registered_engines() -> None:
    parser = build_parser()
    args = parser.parse_args(["agent", "--agent-id", "a", "--engine", "vllm"])
    assert args.engine == "vllm"
    with pytest.raises(SystemExit):
        parser.parse_args(["agent", "--agent-id", "a", "--engine", "sglang"])
