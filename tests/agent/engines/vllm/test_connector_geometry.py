"""The connector's start-up check of vLLM's KV cache groups, on vLLM's own config classes:
one plain attention group is accepted; hybrid, sliding-window and MLA models are refused
with a message that names the group. Runs where vLLM is installed (`make test-vllm`)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here (make test-vllm uses .venv-vllm)")

import torch
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    MLAAttentionSpec,
    SlidingWindowSpec,
)

from cwm_server.agent.engines.vllm.connector import kv_geometry

FULL = FullAttentionSpec(block_size=128, num_kv_heads=8, head_size=128, dtype=torch.bfloat16)
WINDOW = SlidingWindowSpec(
    block_size=128, num_kv_heads=8, head_size=128, dtype=torch.bfloat16, sliding_window=4096
)


def config(*groups: KVCacheGroupSpec) -> KVCacheConfig:
    return KVCacheConfig(num_blocks=16, kv_cache_tensors=[], kv_cache_groups=list(groups))


def layers(prefix: str, count: int) -> list[str]:
    return [f"model.layers.{i}.{prefix}" for i in range(count)]


def test_one_full_attention_group_gives_the_geometry() -> None:
    geometry = kv_geometry(config(KVCacheGroupSpec(layers("self_attn.attn", 32), FULL)))
    assert (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim) == (32, 8, 128)
    assert geometry.bytes_per_token == 128 << 10  # Llama-3-8B: 128 KiB of KV per token


def test_a_hybrid_model_is_refused_naming_each_group() -> None:
    hybrid = config(
        KVCacheGroupSpec(layers("full.attn", 8), FULL),
        KVCacheGroupSpec(layers("local.attn", 24), WINDOW),
    )
    with pytest.raises(ValueError) as refused:
        kv_geometry(hybrid)
    message = str(refused.value)
    assert "has 2: group 0: FullAttentionSpec, 8 layers" in message
    assert "group 1: SlidingWindowSpec (sliding window 4096), 24 layers" in message
    assert "model.layers.0.local.attn" in message


def test_a_sliding_window_model_is_refused() -> None:
    with pytest.raises(ValueError, match=r"sliding-window attention .*SlidingWindowSpec"):
        kv_geometry(config(KVCacheGroupSpec(layers("self_attn.attn", 4), WINDOW)))


def test_an_mla_model_is_refused() -> None:
    mla = MLAAttentionSpec(block_size=64, num_kv_heads=1, head_size=576, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="MLA caches"):
        kv_geometry(config(KVCacheGroupSpec(layers("self_attn.attn", 4), mla)))
