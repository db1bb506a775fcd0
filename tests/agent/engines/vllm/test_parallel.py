"""Tensor parallelism on tensors: which heads each rank holds, and that a canonical window
split over ranks (each rank scattering and gathering only its columns) is the same window at
any rank count, bit for bit."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from cwm_server.agent.engines.vllm.layout import (  # noqa: E402
    PagedKV,
    StridedPlacement,
    Strides,
    canonical_view,
)
from cwm_server.agent.engines.vllm.parallel import HeadShare, head_share  # noqa: E402
from tests.agent.engines.vllm.test_layout import CACHE_DEVICE  # noqa: E402

BLOCK, HEAD_DIM, LAYERS, BLOCKS = 16, 8, 3, 6


def gpu_like_placement() -> StridedPlacement:
    """FLASH_ATTN's logical `[B, H, N, 2D]` on a contiguous cache."""
    token, head, dim = 2 * HEAD_DIM, BLOCK * 2 * HEAD_DIM, 1
    return StridedPlacement(Strides(0, token, head, dim), Strides(HEAD_DIM, token, head, dim))


def rank_caches(heads: int) -> PagedKV:
    shape = (BLOCKS, heads, BLOCK, 2 * HEAD_DIM)
    layers = [torch.zeros(shape, dtype=torch.bfloat16, device=CACHE_DEVICE) for _ in range(LAYERS)]
    return PagedKV(
        layers, gpu_like_placement(), num_kv_heads=heads, head_dim=HEAD_DIM, block_size=BLOCK
    )


def window(heads: int, tokens: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (2, LAYERS, tokens, heads * HEAD_DIM)
    return torch.randn(shape, generator=generator).to(torch.bfloat16)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int16)


@pytest.mark.parametrize(
    ("total", "world", "expected"),
    [
        (8, 1, [(0, 8, True)]),
        (8, 2, [(0, 4, True), (4, 4, True)]),
        (8, 8, [(h, 1, True) for h in range(8)]),
        # More ranks than heads: each head on world // total consecutive ranks.
        (2, 4, [(0, 1, True), (0, 1, False), (1, 1, True), (1, 1, False)]),
        (1, 2, [(0, 1, True), (0, 1, False)]),
    ],
)
def test_each_rank_holds_the_heads_vllm_gives_it(
    total: int, world: int, expected: list[tuple[int, int, bool]]
) -> None:
    shares = [head_share(total, world, rank) for rank in range(world)]
    assert [(s.first_head, s.num_heads, s.writer) for s in shares] == expected
    # The writers' columns tile the chunk exactly once.
    written = sorted(
        column
        for share in shares
        if share.writer
        for column in range(*share.columns(HEAD_DIM).indices(total * HEAD_DIM))
    )
    assert written == list(range(total * HEAD_DIM))


@pytest.mark.parametrize(("total", "world", "rank"), [(8, 3, 0), (2, 3, 1), (4, 2, 2), (0, 1, 0)])
def test_a_split_vllm_could_not_make_is_refused(total: int, world: int, rank: int) -> None:
    with pytest.raises(ValueError):
        head_share(total, world, rank)


def test_a_share_of_a_chunk_is_a_view_of_its_columns() -> None:
    kv = window(4, BLOCK)
    share = head_share(4, 2, 1)
    part = share.of(kv, HEAD_DIM)
    assert part.data_ptr() == kv[..., 2 * HEAD_DIM :].data_ptr()
    part.zero_()
    assert not kv[..., 2 * HEAD_DIM :].any() and kv[..., : 2 * HEAD_DIM].any()
    with pytest.raises(ValueError):
        share.of(window(2, BLOCK), HEAD_DIM)


def freeze_at(paged: list[PagedKV], shares: list[HeadShare], blocks: list[int]) -> bytearray:
    """Every rank gathers its columns into one canonical buffer, as the ranks of a
    tensor-parallel save fill one mapped chunk file."""
    total = shares[0].total_heads
    buffer = bytearray(2 * LAYERS * len(blocks) * BLOCK * total * HEAD_DIM * 2)
    whole = canonical_view(buffer, torch.bfloat16, LAYERS, len(blocks) * BLOCK, total * HEAD_DIM)
    for cache, share in zip(paged, shares, strict=True):
        if share.writer:
            cache.gather(blocks, out=share.of(whole, HEAD_DIM))
    return buffer


def thaw_at(kv: torch.Tensor, world: int, total: int, blocks: list[int]) -> list[PagedKV]:
    shares = [head_share(total, world, rank) for rank in range(world)]
    paged = [rank_caches(share.num_heads) for share in shares]
    for cache, share in zip(paged, shares, strict=True):
        cache.scatter(blocks, share.of(kv, HEAD_DIM))
    return paged


@pytest.mark.parametrize(
    ("total", "frozen_at", "thawed_at"), [(4, 2, 1), (4, 1, 2), (4, 4, 2), (2, 4, 1), (2, 1, 4)]
)
def test_a_window_frozen_at_one_rank_count_thaws_at_another_bit_for_bit(
    total: int, frozen_at: int, thawed_at: int
) -> None:
    original = window(total, 3 * BLOCK, seed=frozen_at)
    blocks_a, blocks_b = [4, 0, 2], [1, 5, 3]
    source = thaw_at(original, frozen_at, total, blocks_a)
    shares_a = [head_share(total, frozen_at, rank) for rank in range(frozen_at)]
    frozen = freeze_at(source, shares_a, blocks_a)
    assert bytes(frozen) == bytes(bits(original).view(torch.uint8).reshape(-1).numpy())

    target = thaw_at(
        canonical_view(frozen, torch.bfloat16, LAYERS, 3 * BLOCK, total * HEAD_DIM),
        thawed_at,
        total,
        blocks_b,
    )
    shares_b = [head_share(total, thawed_at, rank) for rank in range(thawed_at)]
    for cache, share in zip(target, shares_b, strict=True):
        # Each rank of B holds exactly its heads of A's window.
        assert torch.equal(bits(cache.gather(blocks_b)), bits(share.of(original, HEAD_DIM)))
    assert freeze_at(target, shares_b, blocks_b) == frozen
