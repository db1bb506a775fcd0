"""The bytes every system in the suite moves: real KV from the reference model, and random
bf16 words (the worst case for compression)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cwm_client import InMemoryChunk, chunks_from_bytes, pb

MiB = 1 << 20
CHUNK_TOKENS = 256

RANDOM_FINGERPRINT = pb.ModelFingerprint(
    model_id="bench-random-bf16",
    kv_dtype=pb.KvDtype.KV_DTYPE_BFLOAT16,
    num_layers=4,
    num_kv_heads=4,
    head_dim=64,
    engine_name="synthetic",
    block_size=16,
)
"""4 KiB of KV per token: 1 MiB chunks of 256 tokens."""


@dataclass
class Dataset:
    """One window's worth of chunks, plus what the suite needs to say where they came from."""

    name: str
    description: str
    fingerprint: pb.ModelFingerprint
    chunks: list[InMemoryChunk]
    token_ids: list[int]
    session: tuple[list[InMemoryChunk], list[int]] | None = None
    """One session of the window on its own (incremental re-freeze: before)."""
    grown: tuple[list[InMemoryChunk], list[int]] | None = None
    """That session grown by a few hundred tokens (incremental re-freeze: after)."""
    build_s: float = 0.0

    @property
    def raw_bytes(self) -> int:
        return sum(c.raw_size for c in self.chunks)

    @property
    def mib(self) -> float:
        return self.raw_bytes / MiB

    @property
    def pieces(self) -> list[bytes]:
        return [c.raw for c in self.chunks]


def random_bf16(total_mib: int, seed: int = 7) -> Dataset:
    """`total_mib` MiB of uniformly random bf16 words in 1 MiB chunks."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    pieces = [rng.integers(0, 256, MiB, dtype=np.uint8).tobytes() for _ in range(total_mib)]
    tokens = total_mib * CHUNK_TOKENS
    return Dataset(
        name="random",
        description=f"random bf16, {total_mib} MiB in 1 MiB chunks",
        fingerprint=RANDOM_FINGERPRINT,
        chunks=chunks_from_bytes(pieces, CHUNK_TOKENS, tokens),
        token_ids=[i % 32000 for i in range(tokens)],
        build_s=time.perf_counter() - started,
    )


def reference_kv(sessions: int, tokens: int, grow: int, model_dir: Path) -> Dataset:
    """The KV of `sessions` sessions of `tokens` tokens of text on the reference engine
    (the built-in tiny Llama, bf16), as one window; the first session grown by `grow`
    tokens gives the incremental re-freeze."""
    from cwm_server.agent.engines.reference.engine import ReferenceEngine
    from cwm_server.agent.engines.reference.tiny_model import build_corpus, ensure_tiny_model

    started = time.perf_counter()
    engine = ReferenceEngine(ensure_tiny_model(model_dir))
    text = "".join(build_corpus(seed=20261125, sentences=4000 * max(1, sessions)))
    ids = engine.tokenize(text)
    need = sessions * tokens + grow
    if len(ids) < need:
        raise SystemExit(f"corpus gives {len(ids)} tokens, {need} needed")
    if tokens % CHUNK_TOKENS:
        raise SystemExit(f"--kv-tokens must be a multiple of {CHUNK_TOKENS}")
    pieces: list[bytes] = []
    all_ids: list[int] = []
    first: tuple[list[InMemoryChunk], list[int]] | None = None
    grown: tuple[list[InMemoryChunk], list[int]] | None = None
    for session in range(sessions):
        prompt = ids[session * tokens : (session + 1) * tokens]
        salt = f"bench-{session}"
        engine.prefill(salt, prompt)
        token_ids, chunks = engine.export_chunks(salt, chunk_tokens=CHUNK_TOKENS)
        if session == 0 and grow:
            first = (chunks_from_bytes(chunks, CHUNK_TOKENS, len(token_ids)), token_ids)
            engine.prefill(salt, ids[: tokens + grow])
            grown_ids, grown_chunks = engine.export_chunks(salt, chunk_tokens=CHUNK_TOKENS)
            grown = (chunks_from_bytes(grown_chunks, CHUNK_TOKENS, len(grown_ids)), grown_ids)
        engine.drop_session(salt)
        pieces.extend(chunks)
        all_ids.extend(token_ids)
    fingerprint = engine.fingerprint
    return Dataset(
        name="kv",
        description=(
            f"reference-model KV ({fingerprint.model_id}, bf16, {fingerprint.num_layers} "
            f"layers x {fingerprint.num_kv_heads} KV heads x {fingerprint.head_dim}), "
            f"{sessions} sessions x {tokens} tokens of text, "
            f"{len(pieces)} chunks of {len(pieces[0]) // 1024} KiB"
        ),
        fingerprint=fingerprint,
        chunks=chunks_from_bytes(pieces, CHUNK_TOKENS, len(all_ids)),
        token_ids=all_ids,
        session=first,
        grown=grown,
        build_s=time.perf_counter() - started,
    )
