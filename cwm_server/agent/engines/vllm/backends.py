"""Which block layout each vLLM attention backend uses, behind one call: `block_placement`.

- `CPU_ATTN` (vLLM's CPU build): the block's inner layout depends on the kernel's ISA, so it
  is probed through the backend's own `cpu_attn_reshape_and_cache` (`layout.probe_block_layout`);
  the `vec` family comes out strided, AMX/NEON tilings as a permutation.
- `FLASH_ATTN`, `FLASHINFER`, `TRITON_ATTN`: per layer a logical `[B, H, N, 2*D]` view with
  K = `[..., :D]` and V = `[..., D:]` (their code does `kv_cache.transpose(1, 2).split(D, -1)`),
  in whatever physical order the backend asked for: the view's strides say where everything
  is (`layout.logical_placement`).
- Refused with a message that says why: MLA backends (one latent vector per token, no K and
  V to put in a canonical chunk), quantised caches (fp8, int8, nvfp4: bits would not be the
  model dtype's), and any backend not named above (its layout was never checked).

The dispatch is plain data in (backend name, cache tensor, geometry, cache dtype), so it is
tested on CPU tensors built in each backend's layout; only the CPU probe needs vLLM's ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cwm_server.agent.engines.vllm.layout import (
    BlockWriter,
    KVGeometry,
    LayoutError,
    Placement,
    logical_placement,
    probe_block_layout,
)

CPU_BACKEND = "CPU_ATTN"
LOGICAL_BACKENDS = ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN")
PLAIN_CACHE_DTYPES = ("auto", "bfloat16", "float16", "half", "float32", "float")


@dataclass(frozen=True)
class PlacementChoice:
    placement: Placement
    platform: str
    """"cpu" or "gpu": recorded in the fingerprint's engine version."""
    description: str
    """What produced the KV bits: the CPU kernel's ISA ("vec") or the GPU backend's name."""


def check_cache_dtype(cache_dtype: str) -> None:
    if cache_dtype not in PLAIN_CACHE_DTYPES:
        raise LayoutError(
            f"vLLM's KV cache dtype is {cache_dtype!r}: quantised caches are not supported "
            "(a window holds the model dtype's K and V bit for bit); start vLLM with "
            "--kv-cache-dtype auto"
        )


def placement_for(
    backend: str,
    tensor: torch.Tensor,
    geometry: KVGeometry,
    cache_dtype: str,
    cpu_writer: BlockWriter | None = None,
    cpu_isa: str = "",
) -> PlacementChoice:
    """The placement of K and V in `tensor` (one layer's `[B, H, N, C]` cache) for the
    attention backend named `backend`; LayoutError when cwm cannot map it exactly."""
    check_cache_dtype(cache_dtype)
    if "MLA" in backend.upper():
        raise LayoutError(
            f"attention backend {backend} is MLA: its cache holds one latent vector per token, "
            "not K and V, and cwm's canonical chunks cannot represent it yet"
        )
    if backend == CPU_BACKEND:
        if cpu_writer is None:
            raise LayoutError("the CPU backend's layout is probed through its cache writer")
        _, heads, tokens, content = tensor.shape
        layout = probe_block_layout(
            cpu_writer, heads, tokens, geometry.head_dim, content, tensor.dtype
        )
        return PlacementChoice(layout, "cpu", cpu_isa or "cpu")
    if backend in LOGICAL_BACKENDS:
        return PlacementChoice(logical_placement(tensor, geometry.head_dim), "gpu", backend)
    raise LayoutError(
        f"attention backend {backend} is not supported by the cwm connector (supported: "
        f"{', '.join((CPU_BACKEND, *LOGICAL_BACKENDS))}); pick one with --attention-backend"
    )


def block_placement(
    layer: Any, layer_name: str, tensor: torch.Tensor, geometry: KVGeometry, cache_dtype: str
) -> PlacementChoice:
    """`placement_for` the backend vLLM gave attention layer `layer` (its forward-context
    entry), with the CPU backend's kernel as the probe's writer."""
    getter = getattr(layer, "get_attn_backend", None)
    if getter is None:
        raise LayoutError(f"cannot tell which attention backend layer {layer_name} uses")
    backend = str(getter().get_name())
    if backend != CPU_BACKEND:
        return placement_for(backend, tensor, geometry, cache_dtype)
    isa = getattr(layer, "isa", None) or getattr(getattr(layer, "impl", None), "isa", None)
    if not isinstance(isa, str):
        raise LayoutError(f"cannot tell which CPU attention kernel layer {layer_name} uses")
    bound = getattr(layer, "kv_cache", None)
    if isinstance(bound, torch.Tensor) and tuple(bound.shape) != tuple(tensor.shape):
        raise LayoutError(
            f"the attention kernel uses blocks of another size ({tuple(bound.shape)} vs "
            f"{tuple(tensor.shape)}); set --block-size to a size the kernel supports"
        )
    from vllm import _custom_ops as ops

    def write(key: torch.Tensor, value: torch.Tensor, block: torch.Tensor) -> None:
        blocks, heads, tokens, _ = block.shape
        view = block.view(blocks, heads, tokens * 2, -1)
        key_cache, value_cache = view.chunk(2, dim=2)
        slots = torch.arange(tokens, dtype=torch.int64)
        ops.cpu_attn_reshape_and_cache(
            key, value, key_cache, value_cache, slots, isa, 1.0, 1.0, cache_dtype
        )

    return placement_for(backend, tensor, geometry, cache_dtype, write, isa)
