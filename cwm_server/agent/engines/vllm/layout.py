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

import torch

# The integer word each KV dtype's canonical bytes are read and written as (bits, not values).
WORD_DTYPES: dict[torch.dtype, torch.dtype] = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
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


@dataclass(frozen=True)
class Strides:
    """Where one of K or V sits in a block: (token n, head h, dim d) is `offset + n * token
    + h * head + d * dim` elements after the block's first element."""

    offset: int
    token: int
    head: int
    dim: int


@dataclass(frozen=True)
class StridedPlacement:
    """K and V of a block as two strided views. Every layout seen so far is of this kind
    (CPU `vec`: K transposed, V row-major; the GPU backends' logical `[..., :D] / [..., D:]`
    split), and a strided view lets one copy per layer move a whole request's blocks, with
    no index tensor as large as the data."""

    key: Strides
    value: Strides


def strided_placement(layout: BlockLayout) -> StridedPlacement | None:
    """The probed permutation as strides, or None when it is not one (tiled layouts)."""
    n, h, d = layout.block_size, layout.num_kv_heads, layout.head_dim
    index = layout.gather_index.view(2, n, h, d)

    def fit(part: torch.Tensor) -> Strides | None:
        origin = int(part[0, 0, 0])

        def step(axis: int) -> int:
            if part.shape[axis] == 1:
                return 0
            one = [0, 0, 0]
            one[axis] = 1
            return int(part[tuple(one)]) - origin

        strides = Strides(origin, step(0), step(1), step(2))
        expected = (
            origin
            + torch.arange(n).view(n, 1, 1) * strides.token
            + torch.arange(h).view(1, h, 1) * strides.head
            + torch.arange(d).view(1, 1, d) * strides.dim
        )
        return strides if torch.equal(expected, part) else None

    key, value = fit(index[0]), fit(index[1])
    if key is None or value is None:
        return None
    return StridedPlacement(key, value)


def logical_placement(tensor: torch.Tensor, head_dim: int) -> StridedPlacement:
    """The GPU backends' `[B, H, N, 2*D]` view, K = `[..., :D]`, V = `[..., D:]`, in
    whatever physical order the view's strides say (LBHNC, LBNHC, LHBNC, BLHNC, ...)."""
    if tensor.dim() != 4 or tensor.shape[3] != 2 * head_dim:
        raise LayoutError(
            f"expected a [blocks, heads, block_size, 2 * {head_dim}] layer cache, got "
            f"{tuple(tensor.shape)}"
        )
    _, head, token, dim = tensor.stride()
    return StridedPlacement(Strides(0, token, head, dim), Strides(head_dim * dim, token, head, dim))


Placement = BlockLayout | StridedPlacement


class PagedKV:
    """One engine's per-layer caches, read and written block by block in canonical order.

    With a `StridedPlacement` each layer's K and V are two `[blocks, N, H, D]` views of the
    cache, so a request's blocks move with one `index_select` / `index_copy_` per layer and
    K/V, straight into or out of the caller's canonical buffer (a mapped staging file: no
    intermediate copy). A probed permutation that is not strided (tiled layouts) goes
    through the permutation, one layer at a time.
    """

    def __init__(
        self,
        layers: Sequence[torch.Tensor],
        placement: Placement,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        block_size: int | None = None,
    ) -> None:
        if not layers:
            raise LayoutError("no attention layers")
        self.placement = placement
        self.dtype = layers[0].dtype
        self.device = layers[0].device
        if isinstance(placement, BlockLayout):
            num_kv_heads, head_dim = placement.num_kv_heads, placement.head_dim
            block_size = placement.block_size
        if num_kv_heads is None or head_dim is None or block_size is None:
            raise LayoutError("a strided placement needs the heads, head size and block size")
        self.num_kv_heads, self.head_dim, self.block_size = num_kv_heads, head_dim, block_size
        self.hidden = num_kv_heads * head_dim
        self._flat: list[torch.Tensor] = []
        self._views: list[tuple[torch.Tensor, torch.Tensor]] = []
        strided = (
            placement if isinstance(placement, StridedPlacement) else strided_placement(placement)
        )
        for tensor in layers:
            if tensor.dim() != 4 or tensor.dtype != self.dtype:
                raise LayoutError(f"unexpected layer cache {tuple(tensor.shape)} {tensor.dtype}")
            blocks, heads, tokens, content = tensor.shape
            if (heads, tokens) != (num_kv_heads, block_size):
                raise LayoutError(f"layer cache {tuple(tensor.shape)} does not match the probe")
            if isinstance(placement, BlockLayout):
                inner = (tokens * content, content, 1)
                if tuple(tensor.stride()[1:]) != inner:
                    raise LayoutError(
                        f"a layer's block is not one contiguous page (strides {tensor.stride()})"
                    )
                if strided is None:
                    self._flat.append(
                        torch.as_strided(
                            tensor,
                            (blocks, placement.per_block),
                            (tensor.stride(0), 1),
                            tensor.storage_offset(),
                        )
                    )
                    continue
            assert strided is not None
            size = (blocks, block_size, num_kv_heads, head_dim)
            key, value = (
                torch.as_strided(
                    tensor,
                    size,
                    (tensor.stride(0), part.token, part.head, part.dim),
                    tensor.storage_offset() + part.offset,
                )
                for part in (strided.key, strided.value)
            )
            self._views.append((key, value))
        if strided is not None and isinstance(placement, BlockLayout):
            self.placement = strided

    @property
    def num_layers(self) -> int:
        return len(self._views) or len(self._flat)

    @property
    def strided(self) -> bool:
        """Whether blocks move through strided views (else through the permutation)."""
        return bool(self._views)

    def _shape_for(self, count: int) -> tuple[int, int, int, int]:
        return (2, self.num_layers, count * self.block_size, self.hidden)

    def gather(self, block_ids: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks' KV as `[2, L, len(block_ids) * N, H * D]`, written into `out` when
        given (a contiguous host tensor of that shape and the cache's dtype)."""
        k = len(block_ids)
        if out is None:
            out = torch.empty(self._shape_for(k), dtype=self.dtype)
        elif tuple(out.shape) != self._shape_for(k) or out.dtype != self.dtype:
            raise LayoutError(f"KV buffer {tuple(out.shape)} {out.dtype} does not fit {k} blocks")
        index = torch.tensor(list(block_ids), dtype=torch.int64, device=self.device)
        if self._views:
            n, h, d = self.block_size, self.num_kv_heads, self.head_dim
            for layer, views in enumerate(self._views):
                for kv, view in enumerate(views):
                    dest = out[kv, layer].view(k, n, h, d)
                    if dest.device == view.device and dest.is_contiguous():
                        torch.index_select(view, 0, index, out=dest)
                    else:
                        dest.copy_(view.index_select(0, index))
            return out
        layout = self.placement
        assert isinstance(layout, BlockLayout)
        gather = layout.gather_index.to(self.device)
        n = layout.block_size
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
        k = len(block_ids)
        if tuple(kv.shape) != self._shape_for(k) or kv.dtype != self.dtype:
            raise LayoutError(f"KV {tuple(kv.shape)} {kv.dtype} does not fit {k} blocks")
        index = torch.tensor(list(block_ids), dtype=torch.int64, device=self.device)
        if self._views:
            n, h, d = self.block_size, self.num_kv_heads, self.head_dim
            for layer, views in enumerate(self._views):
                for side, view in enumerate(views):
                    src = kv[side, layer].reshape(k, n, h, d)
                    view.index_copy_(0, index, src.to(self.device))
            return
        layout = self.placement
        assert isinstance(layout, BlockLayout)
        gather = layout.gather_index.to(self.device)
        n = layout.block_size
        for layer, flat in enumerate(self._flat):
            src = kv[:, layer].reshape(2, k, n * layout.hidden).transpose(0, 1).reshape(k, -1)
            page = torch.empty(k, layout.per_block, dtype=self.dtype, device=self.device)
            page[:, gather] = src.to(self.device)
            flat.index_copy_(0, index, page)


def canonical_view(
    buffer: bytearray | memoryview, dtype: torch.dtype, num_layers: int, tokens: int, hidden: int
) -> torch.Tensor:
    """The `[2, L, tokens, HD]` tensor over canonical bytes in a writable `buffer` (a mapped
    chunk file), without a copy: reads and writes go straight to the buffer. Canonical bytes
    are little-endian, as the host's are (the connector refuses big-endian hosts). ValueError
    when the buffer does not hold exactly that many elements."""
    word = WORD_DTYPES[dtype]
    expected = 2 * num_layers * tokens * hidden * torch.empty(0, dtype=word).element_size()
    if len(buffer) != expected:
        raise ValueError(f"chunk holds {len(buffer)} bytes, {expected} expected")
    return torch.frombuffer(buffer, dtype=word).view(dtype).view(2, num_layers, tokens, hidden)
