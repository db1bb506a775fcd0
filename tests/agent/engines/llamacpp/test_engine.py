"""llama.cpp in process (llama-cpp-python) with the tiny GGUF: sessions by cache_salt, KV out
as canonical chunks and back into a fresh context, bit for bit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make llamacpp)")

from cwm_client.errors import AlreadyExists, InvalidArgument, NotFound
from cwm_client.fingerprints import fingerprint_differences
from cwm_server.agent.engines.inputs import EngineInputError
from cwm_server.agent.engines.llamacpp.adapter import LlamaCppAdapter
from cwm_server.agent.engines.llamacpp.engine import LlamaCppEngine
from cwm_server.agent.engines.llamacpp.tiny_gguf import ensure_tiny_gguf

TEXT = "The keeper of the lighthouse wrote every storm into a ledger by the window. "


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _engine(gguf: Path, flash_attn: bool) -> LlamaCppEngine:
    return LlamaCppEngine(gguf, n_ctx=2048, flash_attn=flash_attn, n_threads=1)


@pytest.fixture(params=[True, False], ids=["flash-attn", "v-transposed"])
def engines(gguf: Path, request: pytest.FixtureRequest) -> Iterator[tuple[LlamaCppEngine, ...]]:
    pair = (_engine(gguf, request.param), _engine(gguf, request.param))
    yield pair
    for engine in pair:
        engine.close()


def test_a_session_moved_through_chunks_continues_bit_identically(
    engines: tuple[LlamaCppEngine, LlamaCppEngine],
) -> None:
    a, b = engines
    prompt = a.tokenize(TEXT * 26)
    assert len(prompt) > 700
    first = a.generate(prompt, "sess", max_tokens=16)
    tokens, chunks = a.export_chunks("sess", chunk_tokens=256)
    assert tokens == prompt + first.token_ids[:-1]  # the last sampled token has no KV yet
    assert len(chunks) == -(-len(tokens) // 256)

    b.import_chunks("thawed", tokens, chunks)
    follow = tokens + a.tokenize(" And then the lamp went out.")[1:]
    assert np.array_equal(
        a.next_token_logits("sess", follow), b.next_token_logits("thawed", follow)
    )
    on_a = a.generate(follow, "sess", max_tokens=16)
    on_b = b.generate(follow, "thawed", max_tokens=16)
    assert on_b.token_ids == on_a.token_ids
    assert on_b.cached_tokens == len(follow) - 1  # only the last prompt token is recomputed
    _, again = b.export_chunks("thawed", chunk_tokens=256)
    assert again[: len(chunks) - 1] == chunks[:-1]  # whole chunks re-export byte for byte


def test_sessions_swapped_through_one_context_keep_their_own_kv(gguf: Path) -> None:
    shared, alone_x, alone_y = (_engine(gguf, True) for _ in range(3))
    try:
        x, y = shared.tokenize(TEXT * 3), shared.tokenize("Numbers: 1 2 3 4 5 6 7 8 9 " * 6)
        for turn in range(3):
            extra = shared.tokenize(f" turn {turn}")[1:]
            x, y = x + extra, y + extra
            got_x = shared.generate(x, "x", max_tokens=4)
            got_y = shared.generate(y, "y", max_tokens=4)
            assert got_x.token_ids == alone_x.generate(x, "x", max_tokens=4).token_ids
            assert got_y.token_ids == alone_y.generate(y, "y", max_tokens=4).token_ids
            if turn:
                assert got_x.cached_tokens > 0 and got_y.cached_tokens > 0
        assert {s.cache_salt for s in shared.list_sessions()} == {"x", "y"}
    finally:
        for engine in (shared, alone_x, alone_y):
            engine.close()


def test_the_fingerprint_tells_the_two_v_layouts_apart(gguf: Path) -> None:
    on, off = _engine(gguf, True), _engine(gguf, False)
    try:
        diffs = fingerprint_differences(on.fingerprint, off.fingerprint)
        assert len(diffs) == 1 and diffs[0].startswith("engine_version")
        assert "v_trans" in diffs[0]
        assert on.fingerprint.num_layers == 4 and on.fingerprint.num_kv_heads == 2
        assert on.fingerprint.head_dim == 32
    finally:
        on.close()
        off.close()


def test_import_refuses_chunks_that_do_not_fit_and_keeps_the_active_session(gguf: Path) -> None:
    engine = _engine(gguf, True)
    try:
        prompt = engine.tokenize(TEXT * 2)
        before = engine.generate(prompt, "keep", max_tokens=4)
        tokens, chunks = engine.export_chunks("keep", chunk_tokens=64)
        with pytest.raises(EngineInputError, match="whole number of tokens"):
            engine.import_chunks("bad", tokens, [chunks[0][:-2], *chunks[1:]])
        with pytest.raises(EngineInputError, match="the window"):
            engine.import_chunks("bad", [*tokens, 5], chunks)
        with pytest.raises(EngineInputError, match="outside the vocabulary"):
            engine.import_chunks("bad", [1 << 20, *tokens[1:]], chunks)
        assert {s.cache_salt for s in engine.list_sessions()} == {"keep"}
        again = engine.generate(prompt, "keep", max_tokens=4)
        assert again.token_ids == before.token_ids
        assert again.cached_tokens == len(prompt) - 1
    finally:
        engine.close()


def test_the_adapter_names_missing_and_taken_sessions(gguf: Path) -> None:
    adapter = LlamaCppAdapter(_engine(gguf, True))
    try:
        with pytest.raises(NotFound):
            adapter.export_session("nobody", 256)
        adapter.engine.generate(adapter.engine.tokenize(TEXT), "taken", max_tokens=2)
        exported = adapter.export_session("taken", 256)
        with pytest.raises(AlreadyExists):
            adapter.import_session("taken", exported.token_ids, exported.chunks, 256)
        with pytest.raises(InvalidArgument, match="refused the window's KV"):
            adapter.import_session("other", exported.token_ids, [b"\0" * 6], 256)
        assert adapter.request_fields("taken") == {"cache_salt": "taken"}
        assert adapter.default_chunk_tokens() == 2048  # 1 KiB of KV per token
    finally:
        adapter.close()


def test_a_chat_template_llama_cpp_does_not_know_is_refused_by_name(gguf: Path) -> None:
    engine = _engine(gguf, True)
    try:
        with pytest.raises(EngineInputError, match="does not recognise this GGUF's chat template"):
            engine.chat_prompt([{"role": "user", "content": "hello"}])
    finally:
        engine.close()
