"""The chunk span an engine picks by default: whole blocks, chunks of tens of MiB, so models
of every size fit the manager's default chunk cap."""

from __future__ import annotations

from pathlib import Path

import pytest

from cwm_client import pb
from cwm_client.chunks import bytes_per_token
from cwm_server.agent.engines.base import MAX_CHUNK_TOKENS, TARGET_CHUNK_BYTES, chunk_tokens_for
from cwm_server.manager.config import ManagerConfig


def fingerprint(layers: int, kv_heads: int, head_dim: int) -> pb.ModelFingerprint:
    return pb.ModelFingerprint(
        num_layers=layers,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        kv_dtype=pb.KvDtype.KV_DTYPE_BFLOAT16,
    )


GEOMETRIES = {
    "llama-3-8b": fingerprint(32, 8, 128),
    "llama-3-70b": fingerprint(80, 8, 128),
    "llama-3-405b": fingerprint(126, 8, 128),
}


@pytest.mark.parametrize("model", sorted(GEOMETRIES))
@pytest.mark.parametrize("block_size", [16, 128])
def test_default_chunks_fit_the_managers_default_cap(model: str, block_size: int) -> None:
    per_token = bytes_per_token(GEOMETRIES[model])
    span = chunk_tokens_for(per_token, block_size)
    assert span % block_size == 0 and span > 0
    chunk_bytes = span * per_token
    assert chunk_bytes <= ManagerConfig(data_dir=Path("unused")).max_chunk_bytes
    # As large as the target allows: one more block would pass it (or it is one block).
    assert span == block_size or chunk_bytes + block_size * per_token > TARGET_CHUNK_BYTES


def test_an_8b_model_gets_256_token_chunks_and_a_70b_model_96() -> None:
    assert chunk_tokens_for(bytes_per_token(GEOMETRIES["llama-3-8b"]), 128) == 256
    assert chunk_tokens_for(bytes_per_token(GEOMETRIES["llama-3-70b"]), 16) == 96
    assert chunk_tokens_for(bytes_per_token(GEOMETRIES["llama-3-70b"]), 128) == 128


def test_a_small_models_chunks_stop_growing() -> None:
    assert chunk_tokens_for(1024, 128) == MAX_CHUNK_TOKENS
    assert chunk_tokens_for(0, 128, fallback=256) == 256
