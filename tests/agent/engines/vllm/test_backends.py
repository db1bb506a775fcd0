"""Which block layout each attention backend gets, and the backends and caches refused."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from cwm_server.agent.engines.vllm.backends import LOGICAL_BACKENDS, placement_for  # noqa: E402
from cwm_server.agent.engines.vllm.layout import (  # noqa: E402
    KVGeometry,
    LayoutError,
    PagedKV,
    StridedPlacement,
    Strides,
)
from tests.agent.engines.vllm.test_layout import (  # noqa: E402
    BLOCK,
    CONTENT,
    HEAD_DIM,
    HEADS,
    LAYERS,
    flash_writer,
    logical_caches,
    random_kv,
    vec_writer,
)

GEOMETRY = KVGeometry(LAYERS, HEADS, HEAD_DIM, torch.bfloat16, BLOCK)


@pytest.mark.parametrize("backend", LOGICAL_BACKENDS)
def test_gpu_backends_get_the_logical_split_in_their_physical_order(backend: str) -> None:
    caches = logical_caches("LBNHC", 3, torch.bfloat16)
    choice = placement_for(backend, caches[0], GEOMETRY, "auto")
    assert choice.platform == "gpu" and choice.description == backend
    token_stride = HEADS * CONTENT  # LBNHC: a block's tokens hold all heads side by side
    assert choice.placement == StridedPlacement(
        Strides(0, token_stride, CONTENT, 1), Strides(HEAD_DIM, token_stride, CONTENT, 1)
    )
    paged = PagedKV(
        caches, choice.placement, num_kv_heads=HEADS, head_dim=HEAD_DIM, block_size=BLOCK
    )
    kv = random_kv(torch.bfloat16, BLOCK, seed=7)
    for layer, cache in enumerate(caches):
        span = kv[:, layer].view(2, BLOCK, HEADS, HEAD_DIM)
        flash_writer(cache, 1, span[0], span[1])
    assert torch.equal(paged.gather([1]).view(torch.int16), kv.view(torch.int16))


def test_the_cpu_backend_is_probed_through_its_writer() -> None:
    cache = torch.zeros(2, HEADS, BLOCK, CONTENT, dtype=torch.bfloat16)
    choice = placement_for("CPU_ATTN", cache, GEOMETRY, "auto", vec_writer, "vec")
    assert (choice.platform, choice.description) == ("cpu", "vec")
    with pytest.raises(LayoutError, match="probed through its cache writer"):
        placement_for("CPU_ATTN", cache, GEOMETRY, "auto")


@pytest.mark.parametrize(
    ("backend", "cache_dtype", "message"),
    [
        ("FLASHMLA", "auto", "MLA: its cache holds one latent vector per token"),
        ("TRITON_MLA", "auto", "MLA"),
        ("FLASH_ATTN", "fp8", "quantised caches are not supported"),
        ("FLASHINFER", "fp8_e5m2", "--kv-cache-dtype auto"),
        ("TRITON_ATTN", "int8_per_token_head", "quantised"),
        ("FLEX_ATTENTION", "auto", "FLEX_ATTENTION is not supported"),
    ],
)
def test_backends_and_caches_cwm_cannot_map_are_refused_with_the_reason(
    backend: str, cache_dtype: str, message: str
) -> None:
    cache = torch.zeros(2, HEADS, BLOCK, CONTENT, dtype=torch.bfloat16)
    with pytest.raises(LayoutError, match=message):
        placement_for(backend, cache, GEOMETRY, cache_dtype, vec_writer)
