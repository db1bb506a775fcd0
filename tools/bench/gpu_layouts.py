"""The vLLM connector's block moves on a GPU: a window at Llama-3.1-8B's KV geometry scattered
from host memory into a FLASH_ATTN-shaped paged cache on the device and gathered back, through
the same `PagedKV` the connector's worker uses, bit for bit, with the rate of each.

Needs only torch with CUDA (no vLLM): `tools/gpu_check.sh` runs it on a machine with a GPU.

    python3 tools/bench/gpu_layouts.py --tokens 16384 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cwm_server.agent.engines.vllm.layout import PagedKV, logical_placement

LAYERS, HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16  # Llama-3.1-8B, FLASH_ATTN's block size
CHUNK_TOKENS = 256


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    tokens = args.tokens // CHUNK_TOKENS * CHUNK_TOKENS
    blocks = tokens // BLOCK
    # One allocation, [L, B, H, N, 2D] (LBHNC, FLASH_ATTN's usual order), viewed per layer.
    raw = torch.zeros(LAYERS, blocks + 8, HEADS, BLOCK, 2 * HEAD_DIM, dtype=torch.bfloat16)
    raw = raw.cuda()
    layers = [raw[layer] for layer in range(LAYERS)]
    paged = PagedKV(
        layers,
        logical_placement(layers[0], HEAD_DIM),
        num_kv_heads=HEADS,
        head_dim=HEAD_DIM,
        block_size=BLOCK,
    )
    generator = torch.Generator().manual_seed(0)
    window = torch.randint(
        -(2**15),
        2**15,
        (2, LAYERS, tokens, HEADS * HEAD_DIM),
        dtype=torch.int16,
        generator=generator,
    ).view(torch.bfloat16)
    size = window.numel() * 2
    block_ids = list(torch.randperm(blocks + 8, generator=generator)[:blocks].tolist())
    per_chunk = CHUNK_TOKENS // BLOCK
    results: dict[str, object] = {
        "device": torch.cuda.get_device_name(),
        "tokens": tokens,
        "bytes": size,
        "chunk_tokens": CHUNK_TOKENS,
    }
    for name, host in (("pageable", window), ("pinned", window.pin_memory())):
        torch.cuda.synchronize()
        started = time.perf_counter()
        for first in range(0, tokens, CHUNK_TOKENS):
            ids = block_ids[first // BLOCK : first // BLOCK + per_chunk]
            paged.scatter(ids, host[:, :, first : first + CHUNK_TOKENS])
        torch.cuda.synchronize()
        scatter_s = time.perf_counter() - started
        out = torch.empty_like(host)
        started = time.perf_counter()
        for first in range(0, tokens, CHUNK_TOKENS):
            ids = block_ids[first // BLOCK : first // BLOCK + per_chunk]
            paged.gather(ids, out=out[:, :, first : first + CHUNK_TOKENS])
        torch.cuda.synchronize()
        gather_s = time.perf_counter() - started
        equal = torch.equal(out.view(torch.int16), window.view(torch.int16))
        results[name] = {
            "scatter_GBps": round(size / scatter_s / 1e9, 2),
            "gather_GBps": round(size / gather_s / 1e9, 2),
            "bit_identical": equal,
        }
        print(name, results[name], flush=True)
        if not equal:
            print("gathered KV differs from the scattered window", file=sys.stderr)
            return 1
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
