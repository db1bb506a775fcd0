"""Tensor parallelism: which KV heads a vLLM worker rank holds, and its share of a chunk.

A canonical chunk covers every KV head of the model (`[2, L, T, total_heads * D]`); under
tensor parallelism each worker rank caches only some heads, so each rank loads and saves only
its columns of every chunk. The chunk itself never depends on how many ranks wrote it: a
window frozen at TP=2 thaws at TP=1 and the reverse, and its digests are the same.

vLLM splits KV heads the way its `QKVParallelLinear` loads the K and V weights: with more
ranks than KV heads each head is replicated on `world // total_heads` consecutive ranks (a
rank holds one head, `rank // replicas`); otherwise each rank holds `total_heads // world`
consecutive heads. Of several replicas of a head, only the first writes it on a save (they
hold the same bits; one writer keeps the chunk's bytes from depending on a race).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HeadShare:
    """The KV heads one rank holds, as a range of the model's heads."""

    rank: int
    world: int
    first_head: int
    num_heads: int
    total_heads: int
    writer: bool
    """Whether this rank writes its heads into a saved chunk (the first of their replicas)."""

    def columns(self, head_dim: int) -> slice:
        """This rank's columns of a canonical chunk's last dimension."""
        return slice(self.first_head * head_dim, (self.first_head + self.num_heads) * head_dim)

    def of(self, canonical: torch.Tensor, head_dim: int) -> torch.Tensor:
        """This rank's share of a canonical `[2, L, T, total_heads * D]` tensor: a view (no
        copy), whose writes land in the canonical tensor."""
        if canonical.shape[-1] != self.total_heads * head_dim:
            raise ValueError(
                f"a canonical chunk of {canonical.shape[-1]} columns is not "
                f"{self.total_heads} heads of {head_dim}"
            )
        if self.num_heads == self.total_heads:
            return canonical
        return canonical[..., self.columns(head_dim)]


def head_share(total_heads: int, world: int, rank: int) -> HeadShare:
    """The heads that rank `rank` of `world` tensor-parallel ranks holds (ValueError when vLLM
    could not split the heads that way either)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not one of {world} tensor-parallel ranks")
    if total_heads < 1:
        raise ValueError(f"a model with {total_heads} KV heads")
    if world >= total_heads:
        if world % total_heads:
            raise ValueError(
                f"{total_heads} KV heads cannot be replicated evenly over {world} ranks"
            )
        replicas = world // total_heads
        return HeadShare(rank, world, rank // replicas, 1, total_heads, rank % replicas == 0)
    if total_heads % world:
        raise ValueError(f"{total_heads} KV heads cannot be split evenly over {world} ranks")
    count = total_heads // world
    return HeadShare(rank, world, rank * count, count, total_heads, True)
