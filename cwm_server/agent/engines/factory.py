"""Engines chosen by name, imported only when chosen.

An engine's module may pull in heavy, optional dependencies (the reference engine needs torch
and transformers, which an agent beside vLLM never uses), so the registry names a module and a
class instead of importing them: asking for one engine never imports another. vLLM's own
`KVConnectorFactory` maps connector names to module paths the same way.

Adding an engine: a sibling folder with an adapter implementing `EngineAdapter` (including
`from_settings`), and one line in `ENGINES`.
"""

from __future__ import annotations

import importlib

from cwm_server.agent.engines.base import EngineAdapter, EngineSettings

ENGINES: dict[str, tuple[str, str]] = {
    "reference": ("cwm_server.agent.engines.reference.adapter", "ReferenceAdapter"),
    "vllm": ("cwm_server.agent.engines.vllm.adapter", "VllmAdapter"),
    "llama-server": ("cwm_server.agent.engines.llamacpp.server_adapter", "LlamaServerAdapter"),
    "llamacpp": ("cwm_server.agent.engines.llamacpp.adapter", "LlamaCppAdapter"),
}
"""Engine name -> (module, adapter class), imported on first use."""


class UnknownEngine(ValueError):
    """No engine is registered under this name."""


def engine_names() -> list[str]:
    """The names `create_engine` accepts, sorted."""
    return sorted(ENGINES)


def adapter_class(name: str) -> type[EngineAdapter]:
    """The adapter class of engine `name`, importing its module now."""
    try:
        module_name, class_name = ENGINES[name]
    except KeyError:
        raise UnknownEngine(
            f"unknown engine {name!r}; known engines: {', '.join(engine_names())}"
        ) from None
    adapter = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(adapter, type) and issubclass(adapter, EngineAdapter)):
        raise TypeError(f"{module_name}.{class_name} is not an EngineAdapter")
    return adapter


def create_engine(name: str, settings: EngineSettings) -> EngineAdapter:
    """Build engine `name` from `settings` (raises UnknownEngine, EngineSettingsError)."""
    return adapter_class(name).from_settings(settings)
