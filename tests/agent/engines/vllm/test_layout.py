"""vLLM's paged KV blocks and cwm's canonical chunks, without vLLM: the layout probe finds
where a cache writer puts every element, and gathering and scattering through it move bits
exactly where that writer would have put them."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")

from cwm_server.agent.engines.vllm.layout import (  # noqa: E402
    KVGeometry,
    LayoutError,
    PagedKV,
    StridedPlacement,
    Strides,
    canonical_view,
    logical_placement,
    probe_block_layout,
    strided_placement,
)

HEADS, BLOCK, HEAD_DIM, LAYERS = 2, 16, 8, 3
# Where the GPU backends' caches are built: the CPU here; `tools/gpu_check.sh` runs these
# tests with CWM_TEST_DEVICE=cuda on a machine with a GPU.
CACHE_DEVICE = os.environ.get("CWM_TEST_DEVICE", "cpu")
CONTENT = 2 * HEAD_DIM


def vec_writer(key: torch.Tensor, value: torch.Tensor, block: torch.Tensor) -> None:
    """The CPU `vec` kernels' block: per head, K as [head_dim, block_size] (transposed),
    then V as [block_size, head_dim]."""
    tokens = key.shape[0]
    for head in range(key.shape[1]):
        page = block[0, head].view(-1)
        page[: HEAD_DIM * tokens] = key[:, head, :].t().reshape(-1)
        page[HEAD_DIM * tokens :] = value[:, head, :].reshape(-1)


def random_kv(dtype: torch.dtype, tokens: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, LAYERS, tokens, HEADS * HEAD_DIM, generator=generator).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scattered_kv_sits_where_the_backend_writer_puts_it(dtype: torch.dtype) -> None:
    layout = probe_block_layout(vec_writer, HEADS, BLOCK, HEAD_DIM, CONTENT, dtype)
    caches = [torch.zeros(5, HEADS, BLOCK, CONTENT, dtype=dtype) for _ in range(LAYERS)]
    paged = PagedKV(caches, layout)
    assert isinstance(paged.placement, StridedPlacement)
    kv = random_kv(dtype, 2 * BLOCK)
    paged.scatter([3, 1], kv)
    for layer, cache in enumerate(caches):
        for block_id, first in ((3, 0), (1, BLOCK)):
            expected = torch.zeros(1, HEADS, BLOCK, CONTENT, dtype=dtype)
            span = kv[:, layer, first : first + BLOCK].view(2, BLOCK, HEADS, HEAD_DIM)
            vec_writer(span[0], span[1], expected)
            assert torch.equal(cache[block_id].view(torch.uint8), expected[0].view(torch.uint8))
    untouched = [0, 2, 4]
    assert all(not cache[untouched].any() for cache in caches)


def test_gathered_blocks_give_back_the_scattered_bits() -> None:
    dtype = torch.bfloat16
    layout = probe_block_layout(vec_writer, HEADS, BLOCK, HEAD_DIM, CONTENT, dtype)
    caches = [torch.zeros(4, HEADS, BLOCK, CONTENT, dtype=dtype) for _ in range(LAYERS)]
    paged = PagedKV(caches, layout)
    kv = random_kv(dtype, 3 * BLOCK, seed=1)
    paged.scatter([2, 0, 3], kv)
    assert torch.equal(paged.gather([2, 0, 3]).view(torch.int16), kv.view(torch.int16))
    assert torch.equal(
        paged.gather([0]).view(torch.int16), kv[:, :, BLOCK : 2 * BLOCK].view(torch.int16)
    )


def test_kv_that_does_not_fit_the_blocks_is_refused() -> None:
    dtype = torch.bfloat16
    layout = probe_block_layout(vec_writer, HEADS, BLOCK, HEAD_DIM, CONTENT, dtype)
    paged = PagedKV([torch.zeros(2, HEADS, BLOCK, CONTENT, dtype=dtype)], layout)
    with pytest.raises(LayoutError, match="does not fit 1 blocks"):
        paged.scatter([0], torch.zeros(2, 1, BLOCK + 1, HEADS * HEAD_DIM, dtype=dtype))
    with pytest.raises(LayoutError, match="does not fit 1 blocks"):
        paged.scatter([0], torch.zeros(2, 1, BLOCK, HEADS * HEAD_DIM, dtype=torch.float16))


def test_a_writer_that_converts_values_fails_the_probe() -> None:
    """A cache that rescales what it stores (as a quantised one does) cannot be copied bit
    for bit: refused, whether the values leave the probe's range or only stop being whole."""

    def halving(key: torch.Tensor, value: torch.Tensor, block: torch.Tensor) -> None:
        vec_writer(key / 2, value / 2, block)

    def rescaling(key: torch.Tensor, value: torch.Tensor, block: torch.Tensor) -> None:
        vec_writer(key * 0.75 + 0.5, value * 0.75 + 0.5, block)

    with pytest.raises(LayoutError, match="changed values"):
        probe_block_layout(halving, HEADS, BLOCK, HEAD_DIM, CONTENT, torch.float32)
    with pytest.raises(LayoutError, match="converts values"):
        probe_block_layout(rescaling, HEADS, BLOCK, HEAD_DIM, CONTENT, torch.float32)


def test_a_writer_that_leaves_elements_unwritten_fails_the_probe() -> None:
    def keys_only(key: torch.Tensor, value: torch.Tensor, block: torch.Tensor) -> None:
        vec_writer(key, torch.zeros_like(value), block)

    with pytest.raises(LayoutError, match="unwritten"):
        probe_block_layout(keys_only, HEADS, BLOCK, HEAD_DIM, CONTENT, torch.bfloat16)


def test_a_block_holding_more_than_k_and_v_fails_the_probe() -> None:
    with pytest.raises(LayoutError, match="besides plain K and V"):
        probe_block_layout(vec_writer, HEADS, BLOCK, HEAD_DIM, CONTENT + 1, torch.bfloat16)


def test_an_fp8_cache_is_not_supported() -> None:
    with pytest.raises(LayoutError, match="not supported"):
        probe_block_layout(vec_writer, HEADS, BLOCK, HEAD_DIM, CONTENT, torch.float8_e4m3fn)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_canonical_bytes_round_trip_bit_for_bit(dtype: torch.dtype) -> None:
    kv = random_kv(dtype, 24, seed=2)
    geometry = KVGeometry(LAYERS, HEADS, HEAD_DIM, dtype, BLOCK)
    raw = bytearray(24 * geometry.bytes_per_token)
    canonical_view(raw, dtype, LAYERS, 24, geometry.hidden).copy_(kv)
    back = canonical_view(bytearray(raw), dtype, LAYERS, 24, geometry.hidden)
    assert torch.equal(back.view(torch.uint8), kv.view(torch.uint8))
    with pytest.raises(ValueError, match="expected"):
        canonical_view(raw, dtype, LAYERS, 23, geometry.hidden)


def test_canonical_bytes_are_little_endian_k_then_v() -> None:
    kv = torch.zeros(2, 1, 1, 2, dtype=torch.float32)
    kv[0, 0, 0] = torch.tensor([1.0, 2.0])
    kv[1, 0, 0] = torch.tensor([3.0, 4.0])
    data = bytearray(16)
    canonical_view(data, torch.float32, 1, 1, 2).copy_(kv)
    assert data[:4] == bytes.fromhex("0000803f")
    assert data[12:16] == bytes.fromhex("00008040")


def test_the_geometry_names_the_fields_a_staged_window_must_match() -> None:
    geometry = KVGeometry(LAYERS, HEADS, HEAD_DIM, torch.bfloat16, BLOCK)
    assert geometry.staging_layout() == {
        "num_layers": LAYERS,
        "num_kv_heads": HEADS,
        "head_dim": HEAD_DIM,
        "kv_dtype": "bfloat16",
        "block_size": BLOCK,
    }
    assert geometry.bytes_per_token == 2 * LAYERS * HEADS * HEAD_DIM * 2


def pair_tiled_writer(key: torch.Tensor, value: torch.Tensor, block: torch.Tensor) -> None:
    """A tiled block (as AMX's VNNI packing is): per head, K's tokens interleaved in pairs
    along the head dimension, then V as [block_size, head_dim]. Not a strided layout."""
    tokens = key.shape[0]
    for head in range(key.shape[1]):
        page = block[0, head].view(-1)
        pairs = key[:, head, :].reshape(tokens // 2, 2, HEAD_DIM).transpose(1, 2)
        page[: HEAD_DIM * tokens] = pairs.reshape(-1)
        page[HEAD_DIM * tokens :] = value[:, head, :].reshape(-1)


def test_the_vec_layout_is_recognised_as_strided() -> None:
    layout = probe_block_layout(vec_writer, HEADS, BLOCK, HEAD_DIM, CONTENT, torch.bfloat16)
    placement = strided_placement(layout)
    # K transposed: tokens adjacent, head dims BLOCK apart; V after all of K, rows of D.
    assert placement == StridedPlacement(
        key=Strides(offset=0, token=1, head=BLOCK * CONTENT, dim=BLOCK),
        value=Strides(offset=HEAD_DIM * BLOCK, token=HEAD_DIM, head=BLOCK * CONTENT, dim=1),
    )
    assert (
        strided_placement(
            probe_block_layout(pair_tiled_writer, HEADS, BLOCK, HEAD_DIM, CONTENT, torch.bfloat16)
        )
        is None
    )


def test_a_tiled_layout_moves_through_its_permutation_bit_for_bit() -> None:
    dtype = torch.bfloat16
    layout = probe_block_layout(pair_tiled_writer, HEADS, BLOCK, HEAD_DIM, CONTENT, dtype)
    caches = [torch.zeros(4, HEADS, BLOCK, CONTENT, dtype=dtype) for _ in range(LAYERS)]
    paged = PagedKV(caches, layout)
    assert paged.placement is layout
    kv = random_kv(dtype, 2 * BLOCK, seed=3)
    paged.scatter([3, 1], kv)
    expected = torch.zeros(1, HEADS, BLOCK, CONTENT, dtype=dtype)
    span = kv[:, 0, BLOCK : 2 * BLOCK].view(2, BLOCK, HEADS, HEAD_DIM)
    pair_tiled_writer(span[0], span[1], expected)
    assert torch.equal(caches[0][1].view(torch.int16), expected[0].view(torch.int16))
    assert torch.equal(paged.gather([3, 1]).view(torch.int16), kv.view(torch.int16))


def test_gather_writes_into_the_callers_buffer() -> None:
    dtype = torch.float16
    layout = probe_block_layout(vec_writer, HEADS, BLOCK, HEAD_DIM, CONTENT, dtype)
    caches = [torch.zeros(4, HEADS, BLOCK, CONTENT, dtype=dtype) for _ in range(LAYERS)]
    paged = PagedKV(caches, layout)
    kv = random_kv(dtype, 2 * BLOCK, seed=4)
    paged.scatter([0, 2], kv)
    raw = bytearray(kv.numel() * 2)
    out = torch.frombuffer(raw, dtype=torch.int16).view(dtype).view(kv.shape)
    assert paged.gather([0, 2], out=out) is out
    assert bytes(raw) == kv.view(torch.int16).numpy().astype("<i2").tobytes()
    with pytest.raises(LayoutError, match="does not fit 1 blocks"):
        paged.gather([0], out=out)


# The GPU backends (FlashAttention, FlashInfer, Triton): per layer a [B, H, N, 2*D] view of
# one allocation whose physical order vLLM picks per backend; K = [..., :D], V = [..., D:].
PHYSICAL_ORDERS = ["LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC"]


def logical_caches(order: str, blocks: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """The per-layer [B, H, N, C] views of one allocation laid out in `order`."""
    sizes = {"L": LAYERS, "B": blocks, "H": HEADS, "N": BLOCK, "C": CONTENT}
    raw = torch.zeros([sizes[axis] for axis in order], dtype=dtype, device=CACHE_DEVICE)
    logical = raw.permute([order.index(axis) for axis in "LBHNC"])
    return [logical[layer] for layer in range(LAYERS)]


def flash_writer(cache: torch.Tensor, block: int, key: torch.Tensor, value: torch.Tensor) -> None:
    """What the backends' reshape_and_cache does: `kv_cache.transpose(1, 2).split(D, -1)`
    gives K and V as [B, N, H, D]; slot i of the block takes token i."""
    key_cache, value_cache = cache.transpose(1, 2).split(HEAD_DIM, -1)
    key_cache[block] = key.to(cache.device)
    value_cache[block] = value.to(cache.device)


@pytest.mark.parametrize("order", PHYSICAL_ORDERS)
def test_logical_gpu_layouts_round_trip_in_every_physical_order(order: str) -> None:
    dtype = torch.bfloat16
    caches = logical_caches(order, 5, dtype)
    paged = PagedKV(
        caches,
        logical_placement(caches[0], HEAD_DIM),
        num_kv_heads=HEADS,
        head_dim=HEAD_DIM,
        block_size=BLOCK,
    )
    kv = random_kv(dtype, 2 * BLOCK, seed=5)
    paged.scatter([4, 1], kv)
    for layer, cache in enumerate(caches):
        expected = torch.zeros_like(cache)
        for block, first in ((4, 0), (1, BLOCK)):
            span = kv[:, layer, first : first + BLOCK].view(2, BLOCK, HEADS, HEAD_DIM)
            flash_writer(expected, block, span[0], span[1])
        assert torch.equal(cache.view(torch.int16), expected.view(torch.int16))
    assert torch.equal(paged.gather([4, 1]).view(torch.int16), kv.view(torch.int16))
    # Blocks written by the backend read back as canonical K then V.
    fresh = random_kv(dtype, BLOCK, seed=6)
    for layer, cache in enumerate(caches):
        span = fresh[:, layer].view(2, BLOCK, HEADS, HEAD_DIM)
        flash_writer(cache, 2, span[0], span[1])
    assert torch.equal(paged.gather([2]).view(torch.int16), fresh.view(torch.int16))


def test_a_logical_layout_needs_k_and_v_side_by_side() -> None:
    with pytest.raises(LayoutError, match="2 \\* 8"):
        logical_placement(torch.zeros(2, HEADS, BLOCK, HEAD_DIM), HEAD_DIM)
