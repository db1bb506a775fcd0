"""The reference engine on the real tiny model: deterministic build, lossless KV export/import,
cached-token accounting, and the OpenAI-style HTTP front.

Lossless means: session A processes prompt P, its KV is exported as canonical chunks and
imported into a fresh session B; then both are asked for the next-token logits after P + E
(E processed in one forward pass over the cached P on both sides) and the logits must be
torch.equal, and greedy continuations must be identical token for token.
"""

from __future__ import annotations

import json
import random
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from cwm_client import pb  # noqa: E402
from cwm_client.chunks import array_from_chunk, chunk_raw_size, digest  # noqa: E402
from cwm_server.agent.engines.fingerprint import model_fingerprint  # noqa: E402
from cwm_server.agent.engines.inputs import EngineInputError  # noqa: E402
from cwm_server.agent.engines.openai_http import serve_http  # noqa: E402
from cwm_server.agent.engines.reference.engine import ReferenceEngine  # noqa: E402
from cwm_server.agent.engines.reference.sessions import SessionNotFound  # noqa: E402
from cwm_server.agent.engines.reference.tiny_model import ensure_tiny_model, is_built  # noqa: E402

CHUNK_TOKENS = 128


@pytest.fixture(scope="session")
def engine(tiny_model_dir: Path) -> ReferenceEngine:
    return ReferenceEngine(tiny_model_dir)


def _tokens(seed: int, count: int, engine: ReferenceEngine) -> list[int]:
    """Random ids above the special tokens: a prompt the model has never seen."""
    rng = random.Random(seed)
    return [rng.randrange(16, engine.vocab_size) for _ in range(count)]


def _prompt(seed: int, count: int, engine: ReferenceEngine) -> list[int]:
    bos = engine.tokenize("")  # just the BOS the tokenizer prepends
    return bos + _tokens(seed, count - len(bos), engine)


# ---------------------------------------------------------------------------- the model


def test_tiny_model_build_is_deterministic(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = ensure_tiny_model(tmp_path / "again")
    first, second = model_fingerprint(tiny_model_dir), model_fingerprint(again)
    assert first.weights_digest == second.weights_digest
    assert first.tokenizer_digest == second.tokenizer_digest
    assert (tiny_model_dir / "model.safetensors").read_bytes() == (
        again / "model.safetensors"
    ).read_bytes()
    # Idempotent: a second call leaves a finished build alone.
    before = (again / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(again) == again
    assert (again / "model.safetensors").stat().st_mtime_ns == before
    assert is_built(again)


def test_fingerprint_describes_the_kv(engine: ReferenceEngine) -> None:
    fp = engine.fingerprint
    assert fp.model_id == "cwm-tiny-llama"
    assert fp.kv_dtype == pb.KvDtype.KV_DTYPE_BFLOAT16
    assert (fp.num_layers, fp.num_kv_heads, fp.head_dim, fp.block_size) == (4, 2, 32, 16)
    assert fp.engine_name == "reference"
    assert "torch 2.13.0" in fp.engine_version and "transformers" in fp.engine_version
    assert len(fp.weights_digest) == 64 and len(fp.tokenizer_digest) == 64


# ---------------------------------------------------------------------------- lossless


@pytest.mark.parametrize(
    ("seed", "prompt_len", "extension_len"),
    [(1, 300, 24), (2, 257, 1), (3, 420, 60)],
)
def test_export_import_is_bit_exact(
    engine: ReferenceEngine, seed: int, prompt_len: int, extension_len: int
) -> None:
    salt_a, salt_b = f"a-{seed}", f"b-{seed}"
    prompt = _prompt(seed, prompt_len, engine)
    extension = _tokens(seed + 100, extension_len, engine)
    try:
        first = engine.prefill(salt_a, prompt)
        assert first.cached_tokens == 0
        assert engine.session_tokens(salt_a) == prompt  # the KV covers exactly P

        token_ids, chunks = engine.export_chunks(salt_a, chunk_tokens=CHUNK_TOKENS)
        assert token_ids == prompt
        assert len(chunks) == -(-prompt_len // CHUNK_TOKENS)
        fp = engine.fingerprint
        assert len(chunks[0]) == chunk_raw_size(fp, CHUNK_TOKENS)

        info = engine.import_chunks(salt_b, token_ids, chunks, chunk_tokens=CHUNK_TOKENS)
        assert info.num_tokens == prompt_len
        # What B holds is byte for byte what A exported.
        assert engine.export_chunks(salt_b, chunk_tokens=CHUNK_TOKENS)[1] == chunks

        a = engine.prefill(salt_a, prompt + extension)
        b = engine.prefill(salt_b, prompt + extension)
        assert a.cached_tokens == b.cached_tokens == prompt_len
        assert a.logits.dtype == torch.bfloat16
        assert torch.equal(a.logits, b.logits)

        # Greedy continuation after a prompt that diverges right after P: both sessions drop
        # the extension from their cache, keep P, and must then agree token for token.
        other = [(extension[0] + 1 - 16) % (engine.vocab_size - 16) + 16, *extension[1:]]
        gen_a = engine.generate(prompt + other, salt_a, max_tokens=32, temperature=0.0)
        gen_b = engine.generate(prompt + other, salt_b, max_tokens=32, temperature=0.0)
        assert gen_a.cached_tokens == gen_b.cached_tokens == prompt_len
        assert gen_a.token_ids == gen_b.token_ids
        assert len(gen_a.token_ids) == 32 or gen_a.finish_reason == "stop"
        assert gen_a.text == gen_b.text
    finally:
        engine.drop_session(salt_a)
        engine.drop_session(salt_b)


def test_first_request_after_import_reports_cached_tokens(engine: ReferenceEngine) -> None:
    prompt = _prompt(7, 200, engine)
    engine.prefill("src", prompt)
    token_ids, chunks = engine.export_chunks("src", chunk_tokens=CHUNK_TOKENS)
    engine.import_chunks("dst", token_ids, chunks, chunk_tokens=CHUNK_TOKENS)
    result = engine.generate([*prompt, 42, 43], "dst", max_tokens=4, temperature=0.0)
    assert result.prompt_tokens == 202
    assert result.cached_tokens == 200
    # The KV now covers the prompt and every generated token but the last (never fed).
    assert engine.session_tokens("dst") == [*prompt, 42, 43, *result.token_ids[:-1]]
    # A prompt that is exactly the covered tokens recomputes its last token.
    covered = engine.session_tokens("dst")
    assert engine.prefill("dst", covered).cached_tokens == len(covered) - 1
    engine.drop_session("src")
    engine.drop_session("dst")


def test_thaw_mid_conversation(engine: ReferenceEngine) -> None:
    """The agent's real flow: freeze after a completion, thaw elsewhere, continue the chat."""
    prompt = _prompt(61, 150, engine)
    first = engine.generate(prompt, "chat", max_tokens=6, temperature=0.0)
    covered = engine.session_tokens("chat")
    assert covered == prompt + first.token_ids[:-1]
    token_ids, chunks = engine.export_chunks("chat", chunk_tokens=CHUNK_TOKENS)
    engine.import_chunks("chat-thawed", token_ids, chunks, chunk_tokens=CHUNK_TOKENS)
    follow = [*prompt, *first.token_ids, *_tokens(62, 30, engine)]
    a = engine.generate(follow, "chat", max_tokens=16, temperature=0.0)
    b = engine.generate(follow, "chat-thawed", max_tokens=16, temperature=0.0)
    assert a.cached_tokens == b.cached_tokens == len(covered)
    assert a.token_ids == b.token_ids
    assert engine.session_tokens("chat") == engine.session_tokens("chat-thawed")
    assert engine.export_chunks("chat")[1] == engine.export_chunks("chat-thawed")[1]
    engine.drop_session("chat")
    engine.drop_session("chat-thawed")


def test_concurrent_requests_match_sequential(engine: ReferenceEngine) -> None:
    prompts = {f"t{i}": _prompt(70 + i, 60, engine) for i in range(4)}
    expected = {
        salt: engine.generate(p, None, max_tokens=6, temperature=0.0).token_ids
        for salt, p in prompts.items()
    }
    results: dict[str, list[int]] = {}

    def run(salt: str) -> None:
        results[salt] = engine.generate(
            prompts[salt], salt, max_tokens=6, temperature=0.0
        ).token_ids

    threads = [threading.Thread(target=run, args=(salt,)) for salt in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == expected
    for salt in prompts:
        engine.drop_session(salt)


def test_tampered_import_changes_the_logits(engine: ReferenceEngine) -> None:
    """The lossless check is not vacuous: the imported KV really feeds the computation."""
    prompt = _prompt(11, 160, engine)
    extension = _tokens(12, 8, engine)
    engine.prefill("orig", prompt)
    token_ids, chunks = engine.export_chunks("orig", chunk_tokens=CHUNK_TOKENS)
    fp = engine.fingerprint
    last = array_from_chunk(chunks[-1], fp, len(prompt) - CHUNK_TOKENS).copy()
    last[1, -1, -1, :] ^= 0x4000  # flip an exponent bit of the last token's V, last layer
    tampered = [*chunks[:-1], last.tobytes()]
    assert digest(tampered[-1]) != digest(chunks[-1])
    engine.import_chunks("good", token_ids, chunks, chunk_tokens=CHUNK_TOKENS)
    engine.import_chunks("bad", token_ids, tampered, chunk_tokens=CHUNK_TOKENS)
    good = engine.next_token_logits("good", prompt + extension)
    bad = engine.next_token_logits("bad", prompt + extension)
    assert torch.equal(good, engine.next_token_logits("orig", prompt + extension))
    assert not torch.equal(good, bad)
    for salt in ("orig", "good", "bad"):
        engine.drop_session(salt)


def test_export_of_a_prefix(engine: ReferenceEngine) -> None:
    prompt = _prompt(21, 300, engine)
    engine.prefill("whole", prompt)
    _, full_chunks = engine.export_chunks("whole", chunk_tokens=CHUNK_TOKENS)
    ids, chunks = engine.export_chunks("whole", num_tokens=200, chunk_tokens=CHUNK_TOKENS)
    assert ids == prompt[:200]
    assert [len(c) for c in chunks] == [
        chunk_raw_size(engine.fingerprint, 128),
        chunk_raw_size(engine.fingerprint, 72),
    ]
    assert chunks[0] == full_chunks[0]  # chunks are a pure function of their span
    fp = engine.fingerprint
    whole = array_from_chunk(full_chunks[1], fp, 128)
    assert (array_from_chunk(chunks[1], fp, 72) == whole[:, :, :72, :]).all()

    # A prefix thaws like any window: the rest of the prompt is computed on top of it, and the
    # result matches a session that was cut back to the same prefix.
    engine.import_chunks("prefix", ids, chunks, chunk_tokens=CHUNK_TOKENS)
    thawed = engine.prefill("prefix", [*prompt[:200], 99, 100])
    cut = engine.prefill("whole", [*prompt[:200], 99, 100])
    assert thawed.cached_tokens == cut.cached_tokens == 200
    assert torch.equal(thawed.logits, cut.logits)

    with pytest.raises(EngineInputError):
        engine.export_chunks("whole", num_tokens=10_000)
    with pytest.raises(EngineInputError):
        engine.export_chunks("whole", chunk_tokens=100)  # not a multiple of the block size
    with pytest.raises(SessionNotFound):
        engine.export_chunks("nobody")
    engine.drop_session("whole")
    engine.drop_session("prefix")


def test_import_rejects_inconsistent_input(engine: ReferenceEngine) -> None:
    prompt = _prompt(31, 140, engine)
    engine.prefill("src2", prompt)
    ids, chunks = engine.export_chunks("src2", chunk_tokens=CHUNK_TOKENS)
    with pytest.raises(EngineInputError, match="need 2 chunks"):
        engine.import_chunks("x", ids, chunks[:1], chunk_tokens=CHUNK_TOKENS)
    with pytest.raises(EngineInputError, match="bytes"):
        engine.import_chunks("x", ids, [chunks[0], chunks[1][:-2]], chunk_tokens=CHUNK_TOKENS)
    with pytest.raises(EngineInputError, match="vocabulary"):
        engine.import_chunks("x", [*ids[:-1], 10**6], chunks, chunk_tokens=CHUNK_TOKENS)
    assert "x" not in {s.cache_salt for s in engine.list_sessions()}
    engine.drop_session("src2")


def test_sessions_are_listed_and_dropped(engine: ReferenceEngine) -> None:
    engine.generate(_prompt(41, 20, engine), "listed", max_tokens=3, temperature=0.0)
    info = {s.cache_salt: s for s in engine.list_sessions()}["listed"]
    assert info.num_tokens == 22  # 20 prompt tokens + 2 of the 3 generated
    assert info.last_active > 0
    assert engine.drop_session("listed") is True
    assert engine.drop_session("listed") is False
    # No salt: nothing is kept.
    engine.generate(_prompt(42, 20, engine), None, max_tokens=2, temperature=0.0)
    assert "listed" not in {s.cache_salt for s in engine.list_sessions()}


def test_seeded_sampling_is_reproducible(engine: ReferenceEngine) -> None:
    prompt = _prompt(51, 40, engine)
    runs = [
        engine.generate(prompt, None, max_tokens=8, temperature=1.0, seed=5).token_ids
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


# ---------------------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def http_base(engine: ReferenceEngine) -> Iterator[str]:
    server, port = serve_http(engine, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()


def _call(base: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(
        base + path, data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_http_completions_text_and_tokens(engine: ReferenceEngine, http_base: str) -> None:
    assert _call(http_base, "/health")[0] == 200
    status, models = _call(http_base, "/v1/models")
    assert status == 200 and models["data"][0]["id"] == engine.model_id

    text = "The cache quickly stores the tokens, and then the manager verifies every block."
    status, first = _call(
        http_base,
        "/v1/completions",
        {"model": engine.model_id, "prompt": text, "cache_salt": "web", "max_tokens": 5,
         "temperature": 0},
    )  # fmt: skip
    assert status == 200, first
    assert first["object"] == "text_completion"
    choice = first["choices"][0]
    assert choice["finish_reason"] in ("length", "stop") and isinstance(choice["text"], str)
    prompt_ids = engine.tokenize(text)
    usage = first["usage"]
    assert usage["prompt_tokens"] == len(prompt_ids)
    assert usage["completion_tokens"] == len(choice["token_ids"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0

    # Second turn on the same salt, as token ids: the first turn's prompt is served from cache.
    follow = [*prompt_ids, *choice["token_ids"], *engine.tokenize(" And then?")[1:]]
    status, second = _call(
        http_base,
        "/v1/completions",
        {"prompt": follow, "cache_salt": "web", "max_tokens": 3, "temperature": 0,
         "return_token_ids": True},
    )  # fmt: skip
    assert status == 200, second
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == len(prompt_ids) + len(choice["token_ids"]) - 1
    assert second["choices"][0]["prompt_token_ids"] == follow
    engine.drop_session("web")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 4}, "prompt"),
        ({"prompt": 5, "max_tokens": 4}, "prompt"),
        ({"prompt": "", "max_tokens": 4}, "prompt"),
        ({"prompt": [1, "x"], "max_tokens": 4}, "prompt"),
        ({"prompt": ["a", "b"], "max_tokens": 4}, "prompt"),
        ({"prompt": [1, 10**9], "max_tokens": 4}, "prompt"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 10**7}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": "4"}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": True}, "max_tokens"),
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "seed": 1.5}, "seed"),
        ({"prompt": "hi", "cache_salt": 3}, "cache_salt"),
        ([1, 2], None),
    ],
)
def test_http_bad_input_is_400(http_base: str, body: Any, param: str | None) -> None:
    status, answer = _call(http_base, "/v1/completions", body)
    assert status == 400, answer
    assert answer["error"]["code"] == 400 and answer["error"]["message"]
    assert answer["error"]["param"] == param


def test_http_malformed_and_unknown(http_base: str) -> None:
    status, answer = _call(http_base, "/v1/completions", raw=b"{not json")
    assert status == 400 and "JSON" in answer["error"]["message"]
    status, answer = _call(http_base, "/v1/completions", {"prompt": "hi", "model": "other"})
    assert status == 404
    assert _call(http_base, "/v1/nothing")[0] == 404


def _stream(base: str, path: str, body: dict[str, Any]) -> list[Any]:
    """The events of a streamed response, in order ("[DONE]" last)."""
    request = urllib.request.Request(
        base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        raw = response.read().decode()
    events: list[Any] = []
    for block in raw.split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_http_streams_one_event_per_token_matching_the_plain_reply(
    engine: ReferenceEngine, http_base: str
) -> None:
    body = {"prompt": "The manager verifies", "max_tokens": 6, "temperature": 0}
    status, plain = _call(http_base, "/v1/completions", body)
    assert status == 200
    events = _stream(
        http_base,
        "/v1/completions",
        {**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert events[-1] == "[DONE]"
    *token_events, finish, usage = events[:-1]
    tokens = [t for e in token_events for t in e["choices"][0]["token_ids"]]
    assert tokens == plain["choices"][0]["token_ids"]
    assert len(token_events) == len(tokens)  # one event per token
    assert "".join(e["choices"][0]["text"] for e in token_events) == plain["choices"][0]["text"]
    assert finish["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert usage["choices"] == [] and usage["usage"] == plain["usage"]


def test_http_chat_completions_use_a_chat_template_and_the_session_cache(
    engine: ReferenceEngine, http_base: str
) -> None:
    messages = [
        {"role": "system", "content": "You keep context windows."},
        {"role": "user", "content": "What does the manager verify?"},
    ]
    body = {"messages": messages, "cache_salt": "chat", "max_tokens": 4, "temperature": 0}
    status, first = _call(http_base, "/v1/chat/completions", body)
    assert status == 200, first
    assert first["object"] == "chat.completion"
    reply = first["choices"][0]["message"]
    assert reply["role"] == "assistant" and isinstance(reply["content"], str)
    assert first["usage"]["prompt_tokens"] == len(engine.chat_prompt(messages))
    longer = {**body, "messages": [*messages, {"role": "assistant", "content": "Chunks."}]}
    status, second = _call(http_base, "/v1/chat/completions", longer)
    assert status == 200
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the first turn's
    events = _stream(http_base, "/v1/chat/completions", {**body, "stream": True})
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert streamed == first["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
        ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages"),
    ],
)
def test_http_refuses_what_it_does_not_do_naming_the_field(
    http_base: str, path: str, body: dict[str, Any], param: str
) -> None:
    status, error = _call(http_base, path, body)
    assert status == 400 and error["error"]["param"] == param, error
