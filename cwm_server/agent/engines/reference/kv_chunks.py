"""A reference-engine session's KV to canonical chunks and back.

transformers keeps K and V per layer as `[batch=1, kv_heads, tokens, head_dim]` in the model's
dtype; a chunk is `[2, num_layers, tokens, kv_heads * head_dim]`, K then V, little-endian,
C order. Bits are moved through integer views that torch and numpy share and are never
reinterpreted as numbers, so an export followed by an import restores the exact bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from cwm_client import pb
from cwm_client.chunks import array_from_chunk, chunk_raw_size, chunks_from_array, token_spans
from cwm_server.agent.engines.inputs import EngineInputError

# The integer word each dtype travels as in canonical chunk bytes (numpy has no bfloat16).
# (torch integer view, numpy integer view, canonical word): bits are moved through the integer
# views, which both libraries share, and never reinterpreted as numbers.
_WORD_DTYPES: dict[torch.dtype, tuple[torch.dtype, type[np.integer[Any]], str]] = {
    torch.bfloat16: (torch.int16, np.int16, "<u2"),
    torch.float16: (torch.int16, np.int16, "<f2"),
    torch.float32: (torch.int32, np.int32, "<f4"),
}


def _layer_kv(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    """A full-attention cache layer's K and V, [batch=1, kv_heads, tokens, head_dim]."""
    if type(layer) is not DynamicLayer or layer.keys is None or layer.values is None:
        raise TypeError(f"unsupported KV cache layer {type(layer).__name__}")
    return layer.keys, layer.values


class KVChunkCodec:
    """Canonical chunks of one model's KV: its dtype, shape and fingerprint."""

    def __init__(
        self,
        fingerprint: pb.ModelFingerprint,
        dtype: torch.dtype,
        config: Any,
        device: torch.device,
    ) -> None:
        self.fingerprint = fingerprint
        self.dtype = dtype
        self.num_layers = int(fingerprint.num_layers)
        self.num_kv_heads = int(fingerprint.num_kv_heads)
        self.head_dim = int(fingerprint.head_dim)
        self._config = config
        self._device = device

    def copy_out(self, cache: DynamicCache, count: int) -> torch.Tensor:
        """The first `count` tokens' KV as a CPU copy `[2, L, H, T, D]`, so later requests
        cannot touch it; taken under the engine's lock."""
        layers = [_layer_kv(layer) for layer in cache.layers]
        keys = torch.stack([k[0, :, :count, :] for k, _ in layers])
        values = torch.stack([v[0, :, :count, :] for _, v in layers])
        return torch.stack([keys, values]).to("cpu")

    def to_chunks(self, kv: torch.Tensor, chunk_tokens: int) -> list[bytes]:
        """`[2, L, H, T, D]` KV (from `copy_out`) as canonical chunk bytes."""
        count = kv.shape[3]
        # [2, L, H, T, D] -> [2, L, T, H, D] -> [2, L, T, H*D]
        kv = kv.permute(0, 1, 3, 2, 4).reshape(
            2, self.num_layers, count, self.num_kv_heads * self.head_dim
        )
        array = self._to_words(kv.contiguous())
        return [chunk.raw for chunk in chunks_from_array(array, chunk_tokens)]

    def to_cache(
        self,
        token_count: int,
        chunks: Sequence[bytes | bytearray | memoryview],
        chunk_tokens: int,
    ) -> DynamicCache:
        """A fresh cache holding exactly the chunks' KV for `token_count` tokens
        (EngineInputError when the chunks do not fit)."""
        spans = token_spans(token_count, chunk_tokens)
        if len(spans) != len(chunks):
            raise EngineInputError(
                f"{token_count} tokens in chunks of {chunk_tokens} need {len(spans)} chunks, "
                f"got {len(chunks)}"
            )
        fingerprint = self.fingerprint
        arrays = []
        for index, ((_, count), raw) in enumerate(zip(spans, chunks, strict=True)):
            expected = chunk_raw_size(fingerprint, count)
            if len(raw) != expected:
                raise EngineInputError(
                    f"chunk {index} has {len(raw)} bytes; {count} tokens need {expected}"
                )
            arrays.append(array_from_chunk(memoryview(raw), fingerprint, count))
        words = np.concatenate(arrays, axis=2)  # [2, L, T, H*D], a fresh, writable copy
        kv = self._from_words(words).reshape(
            2, self.num_layers, token_count, self.num_kv_heads, self.head_dim
        )
        kv = kv.permute(0, 1, 3, 2, 4).unsqueeze(2)  # [2, L, batch=1, H, T, D]
        layers = [
            (
                kv[0, layer].contiguous().to(self._device),
                kv[1, layer].contiguous().to(self._device),
            )
            for layer in range(self.num_layers)
        ]
        return DynamicCache(ddp_cache_data=layers, config=self._config)

    def _to_words(self, kv: torch.Tensor) -> np.ndarray:
        """KV tensor -> numpy array of the canonical little-endian words."""
        torch_int, _, word = _WORD_DTYPES[self.dtype]
        native = kv.view(torch_int).numpy().view(np.dtype(word).newbyteorder("="))
        return native.astype(word, copy=False)  # a no-op on little-endian hosts

    def _from_words(self, words: np.ndarray) -> torch.Tensor:
        """Canonical words -> KV tensor in the model's dtype (shares `words`' memory)."""
        _, numpy_int, word = _WORD_DTYPES[self.dtype]
        native = words.astype(np.dtype(word).newbyteorder("="), copy=False)
        return torch.from_numpy(np.ascontiguousarray(native).view(numpy_int)).view(self.dtype)
