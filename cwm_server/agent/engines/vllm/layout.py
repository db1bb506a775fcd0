"""Moving vLLM's paged KV blocks to and from cwm's canonical chunk layout.

Canonical: `[2, num_layers, tokens, num_kv_heads * head_dim]`, K then V, little-endian.

vLLM 0.32 hands a connector one tensor per attention layer, a `[blocks, heads, block_size, C]`
view of the cache (RFC 42082's per-layer `[B, H, N, C]`). What the bytes inside one block
mean is up to the attention backend, and on CPU it even depends on the instruction set the
kernel picked (`layer.isa`):

- `vec`, `vec16`, `vxe`, `vsx`, `rvv` (x86 AVX2/AVX-512 without AMX, Power, s390x, RISC-V):
  `C = 2 * head_dim`, and each (block, head) holds K as `[head_dim, block_size]` (transposed)
  followed by V as `[block_size, head_dim]`;
- `amx` (Intel Xeon with AMX, bf16) and `neon` (Arm) pack K and V into tiles for their
  matrix units.

Rather than hard-coding any of these, `probe_block_layout` asks the backend's own
`reshape_and_cache` kernel where it puts each element: it writes a scratch block whose K and
V values spell out their canonical position (in base-256 digits, exact in bf16, fp16 and
fp32), then reads back where every value landed. The result is a permutation, checked to be
a bijection, from canonical order to positions inside a block; gathering and scattering with
it is exact (bits are copied, never converted). A kernel that does more than move bits (an
fp8 cache quantises) fails the probe, and the connector refuses to run rather than guess.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# The integer word each KV dtype travels as in canonical bytes (numpy has no bfloat16).
WORD_DTYPES: dict[torch.dtype, tuple[torch.dtype, str]] = {
    torch.bfloat16: (torch.int16, "<i2"),
    torch.float16: (torch.int16, "<i2"),
    torch.float32: (torch.int32, "<i4"),
}

# (key [N, H, D], value [N, H, D], scratch block [1, H, N, C]) -> writes the block the way the
# attention backend writes its cache, slot i holding token i.
BlockWriter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


class LayoutError(RuntimeError):
    """The cache's block layout cannot be mapped to the canonical layout exactly."""


@dataclass(frozen=True)
class KVGeometry:
    """The shape of the engine's one KV cache group: what every staged window must match and
    what sizes every chunk."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int

    @property
    def dtype_name(self) -> str:
        """The dtype as the staging files spell it ("bfloat16")."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def hidden(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def bytes_per_token(self) -> int:
        """Canonical bytes of one token's K and V over all layers."""
        element = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.hidden * element

    def staging_layout(self) -> dict[str, int | str]:
        """The fields a staged window's manifest records under "layout"."""
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "kv_dtype": self.dtype_name,
            "block_size": self.block_size,
        }


@dataclass(frozen=True)
class BlockLayout:
    num_kv_heads: int
    block_size: int
    head_dim: int
    per_block: int
    """Elements of one layer's block as the cache stores it (H * N * C)."""
    gather_index: torch.Tensor
    """int64 [2 * N * H * D]: canonical element (kv, token, head, dim) -> position in a block."""

    @property
    def hidden(self) -> int:
        return self.num_kv_heads * self.head_dim


def probe_block_layout(
    writer: BlockWriter,
    num_kv_heads: int,
    block_size: int,
    head_dim: int,
    content: int,
    dtype: torch.dtype,
) -> BlockLayout:
    """Discover where the backend's writer puts each K and V element of a block."""
    if dtype not in WORD_DTYPES:
        raise LayoutError(f"KV cache dtype {dtype} is not supported (bf16, fp16, fp32 are)")
    per_block = num_kv_heads * block_size * content
    canonical = 2 * block_size * num_kv_heads * head_dim
    if per_block != canonical:
        raise LayoutError(
            f"a block holds {per_block} elements per layer but K and V need {canonical}: "
            "this cache stores something besides plain K and V"
        )
    ids = torch.arange(canonical, dtype=torch.int64)
    digits = max(1, math.ceil(math.log(canonical, 256)))
    position_of = torch.zeros(canonical, dtype=torch.int64)
    for digit in range(digits):
        # 1..256: exact in bf16, fp16 and fp32; 0 marks an element the kernel never wrote.
        values = ((ids // (256**digit)) % 256 + 1).to(torch.float32)
        kv = values.view(2, block_size, num_kv_heads, head_dim).to(dtype)
        block = torch.zeros(1, num_kv_heads, block_size, content, dtype=dtype)
        writer(kv[0].contiguous(), kv[1].contiguous(), block)
        landed = block.reshape(-1).to(torch.float32)
        if bool((landed < 1).any()) or bool((landed > 256).any()):
            raise LayoutError("the cache writer left elements unwritten or changed values")
        if bool((landed != landed.round()).any()):
            raise LayoutError("the cache writer converts values (a quantised cache?)")
        position_of += (landed.to(torch.int64) - 1) * (256**digit)
    # position_of[p] = canonical id stored at block position p; invert it.
    if not torch.equal(torch.sort(position_of).values, ids):
        raise LayoutError("the cache writer's placement is not a permutation of K and V")
    gather_index = torch.empty(canonical, dtype=torch.int64)
    gather_index[position_of] = torch.arange(canonical, dtype=torch.int64)
    return BlockLayout(num_kv_heads, block_size, head_dim, per_block, gather_index)


class PagedKV:
    """One engine's per-layer caches, read and written block by block in canonical order."""

    def __init__(self, layers: Sequence[torch.Tensor], layout: BlockLayout) -> None:
        if not layers:
            raise LayoutError("no attention layers")
        self.layout = layout
        self.dtype = layers[0].dtype
        self._flat: list[torch.Tensor] = []
        for tensor in layers:
            if tensor.dim() != 4 or tensor.dtype != self.dtype:
                raise LayoutError(f"unexpected layer cache {tuple(tensor.shape)} {tensor.dtype}")
            blocks, heads, tokens, content = tensor.shape
            if (heads, tokens) != (layout.num_kv_heads, layout.block_size):
                raise LayoutError(f"layer cache {tuple(tensor.shape)} does not match the probe")
            inner = (tokens * content, content, 1)
            if tuple(tensor.stride()[1:]) != inner:
                raise LayoutError(
                    f"a layer's block is not one contiguous page (strides {tensor.stride()})"
                )
            self._flat.append(
                torch.as_strided(
                    tensor,
                    (blocks, layout.per_block),
                    (tensor.stride(0), 1),
                    tensor.storage_offset(),
                )
            )

    @property
    def num_layers(self) -> int:
        return len(self._flat)

    def gather(self, block_ids: Sequence[int]) -> torch.Tensor:
        """A copy of the blocks' KV as `[2, L, len(block_ids) * N, H * D]`."""
        layout = self.layout
        index = torch.tensor(list(block_ids), dtype=torch.int64, device=self._flat[0].device)
        gather = layout.gather_index.to(index.device)
        n, k = layout.block_size, len(block_ids)
        out = torch.empty(2, self.num_layers, k * n, layout.hidden, dtype=self.dtype)
        for layer, flat in enumerate(self._flat):
            picked = flat.index_select(0, index)[:, gather]  # [k, 2 * N * HD] canonical order
            out[:, layer] = (
                picked.view(k, 2, n, layout.hidden)
                .transpose(0, 1)
                .reshape(2, k * n, layout.hidden)
                .cpu()
            )
        return out

    def scatter(self, block_ids: Sequence[int], kv: torch.Tensor) -> None:
        """Write `[2, L, len(block_ids) * N, H * D]` canonical KV into the blocks."""
        layout = self.layout
        n, k = layout.block_size, len(block_ids)
        if tuple(kv.shape) != (2, self.num_layers, k * n, layout.hidden) or kv.dtype != self.dtype:
            raise LayoutError(f"KV {tuple(kv.shape)} {kv.dtype} does not fit {k} blocks")
        device = self._flat[0].device
        index = torch.tensor(list(block_ids), dtype=torch.int64, device=device)
        gather = layout.gather_index.to(device)
        for layer, flat in enumerate(self._flat):
            src = kv[:, layer].reshape(2, k, n * layout.hidden).transpose(0, 1).reshape(k, -1)
            page = torch.empty(k, layout.per_block, dtype=self.dtype, device=device)
            page[:, gather] = src.to(device)
            flat.index_copy_(0, index, page)


def to_canonical_bytes(kv: torch.Tensor) -> bytes:
    """Canonical little-endian bytes of a `[2, L, T, HD]` tensor (bits copied, not converted)."""
    word, numpy_word = WORD_DTYPES[kv.dtype]
    array = kv.contiguous().view(word).numpy()
    return np.ascontiguousarray(array).astype(numpy_word, copy=False).tobytes()


def from_canonical_bytes(
    data: bytes | memoryview, dtype: torch.dtype, num_layers: int, tokens: int, hidden: int
) -> torch.Tensor:
    """The `[2, L, tokens, HD]` tensor in canonical bytes (raises ValueError on a bad size)."""
    numpy_word = WORD_DTYPES[dtype][1]
    array = np.frombuffer(data, dtype=numpy_word)
    expected = 2 * num_layers * tokens * hidden
    if array.size != expected:
        raise ValueError(f"chunk holds {array.size} elements, {expected} expected")
    native = array.astype(array.dtype.newbyteorder("="), copy=True)
    return torch.from_numpy(native).view(dtype).view(2, num_layers, tokens, hidden)
