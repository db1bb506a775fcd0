"""The reference engine: HF transformers on CPU (or GPU) with per-session KV caches.

It exists so cwm can be built and tested end to end without vLLM or a GPU, and so there is one
engine whose KV handling is small enough to read in full. Sessions are keyed by `cache_salt`,
as in vLLM: a request whose prompt extends what a session already holds reuses that KV and
reports how many prompt tokens it served from cache (`cached_tokens`).

What a session's KV covers (the invariant everything else relies on)
--------------------------------------------------------------------
`session.tokens` lists exactly the tokens whose K and V sit in `session.cache`, position i of
the cache holding token i. Nothing else is kept: no logits, no pending token. So:

* After a request with prompt P that generated g_1..g_n, the KV covers P + g_1..g_{n-1}: the
  last generated token was sampled but never fed through the model, so it has no KV yet.
  (With n == 1, or a prefill through `prefill`, the KV covers exactly P.)
* The next request with prompt P' keeps the longest common prefix of `session.tokens` and P',
  drops the rest of the cache, and feeds the remaining tokens of P' through the model in ONE
  forward pass over the kept KV. At least one token is always fed (the next-token logits have
  to come from somewhere), so a prompt equal to the covered tokens recomputes its last token.

Why this makes a thaw lossless, bit for bit
-------------------------------------------
Frozen KV is exactly `session.tokens`' KV, copied out byte for byte. A thawed session holds
the same bytes at the same positions, and the next request runs the same computation over
them as the uninterrupted session would: the same new tokens, in one forward pass of the same
shape, at the same positions. bf16 results depend on how a computation is batched (one token
at a time rounds differently from a block), which is why the protocol fixes the batching: a
request's uncached tokens always go in one forward pass, on both sides.

Thread safety: one lock serialises every call. The HTTP server and the agent thread both call
in; the model runs one forward at a time anyway.

This module runs the model; beside it, `sessions` keeps the session table, `kv_chunks` turns a
session's KV into canonical chunks and back, and `inputs` checks what callers ask for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.utils import logging as hf_logging

from cwm_client import pb
from cwm_server.agent.engines.decode_loop import decode
from cwm_server.agent.engines.fingerprint import REFERENCE_BLOCK_SIZE, model_fingerprint
from cwm_server.agent.engines.inputs import (
    EngineInputError,
    check_chunk_tokens,
    check_prompt,
    check_salt,
    check_sampling,
    check_token_ids,
)
from cwm_server.agent.engines.openai_http import GenerationResult
from cwm_server.agent.engines.reference.kv_chunks import KVChunkCodec
from cwm_server.agent.engines.reference.sessions import (
    DEFAULT_MAX_SESSIONS,
    Session,
    SessionInfo,
    SessionTable,
    common_prefix,
)

FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
"""The chat template of a model whose tokenizer has none: one line per message,
"role: content", then "assistant:"."""

DEFAULT_CHUNK_TOKENS = 256

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


@dataclass(frozen=True)
class PrefillResult:
    """Next-token logits after a prompt, and how much of the prompt came from cache."""

    logits: torch.Tensor  # [vocab], the model's dtype, exactly what sampling sees
    prompt_tokens: int
    cached_tokens: int


class ReferenceEngine:
    """A causal LM from a local directory, with sessions keyed by cache_salt.

    Public API: `generate`, `prefill`, `next_token_logits`, `export_chunks`, `import_chunks`,
    `list_sessions`, `session_tokens`, `drop_session`, `tokenize`, `detokenize`, and the
    `fingerprint`, `model_id`, `max_model_len` and `block_size` properties.
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        dtype: str = "bfloat16",
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        model_id: str | None = None,
    ) -> None:
        if dtype not in _TORCH_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_TORCH_DTYPES)}, got {dtype!r}")
        self._model_dir = Path(model_dir).resolve()
        self._device = torch.device(device)
        self._dtype = _TORCH_DTYPES[dtype]
        self._lock = threading.RLock()
        # The Rust tokenizer can fail with "Already borrowed" when one instance is used from
        # several threads at once; its own lock keeps tokenising off the model lock.
        self._tokenizer_lock = threading.Lock()
        self._sessions = SessionTable(self._new_cache, max_sessions)

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # clutters logs
        self._tokenizer: Any = AutoTokenizer.from_pretrained(self._model_dir)
        # Any: transformers' typing of models is partial, and the calls below are plain torch.
        self._model: Any = cast(
            Any, AutoModelForCausalLM.from_pretrained(self._model_dir, dtype=self._dtype)
        )
        self._model.to(self._device)
        self._model.eval()
        config = self._model.config.get_text_config(decoder=True)
        self._config = self._model.config
        self._vocab_size = int(config.vocab_size)
        self._max_model_len = int(config.max_position_embeddings)
        self._num_layers = int(config.num_hidden_layers)
        self._num_kv_heads = int(config.num_key_value_heads or config.num_attention_heads)
        self._head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        probe = DynamicCache(config=self._config)
        if any(type(layer) is not DynamicLayer for layer in probe.layers):
            # Sliding-window or linear-attention layers do not keep every token's KV, so a
            # freeze of them could not restore the session; refuse such models up front.
            kinds = sorted({type(layer).__name__ for layer in probe.layers})
            raise ValueError(f"only full-attention models are supported, cache layers: {kinds}")
        eos = self._model.generation_config.eos_token_id
        if eos is None:
            eos = config.eos_token_id
        self._eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self._fingerprint = model_fingerprint(self._model_dir, kv_dtype=dtype, model_id=model_id)
        if (
            self._fingerprint.num_layers != self._num_layers
            or self._fingerprint.num_kv_heads != self._num_kv_heads
            or self._fingerprint.head_dim != self._head_dim
        ):
            raise ValueError("model config and loaded model disagree on the KV shape")
        self._kv = KVChunkCodec(self._fingerprint, self._dtype, self._config, self._device)

    # ------------------------------------------------------------------ properties

    @property
    def fingerprint(self) -> pb.ModelFingerprint:
        """A copy of the engine's fingerprint (callers may mutate their copy)."""
        copy = pb.ModelFingerprint()
        copy.CopyFrom(self._fingerprint)
        return copy

    @property
    def model_id(self) -> str:
        return self._fingerprint.model_id

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def block_size(self) -> int:
        return REFERENCE_BLOCK_SIZE

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos_ids

    # ------------------------------------------------------------------ text

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` as a prompt (with the tokenizer's BOS, like vLLM does)."""
        with self._tokenizer_lock:
            return list(self._tokenizer(text)["input_ids"])

    def detokenize(self, token_ids: Sequence[int]) -> str:
        with self._tokenizer_lock:
            return str(self._tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of a chat, ready for the assistant's turn: the model's own chat
        template, or (for a model without one, such as the built-in tiny model)
        `FALLBACK_CHAT_TEMPLATE`."""
        with self._tokenizer_lock:
            template = getattr(self._tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE
            ids = self._tokenizer.apply_chat_template(
                list(messages), chat_template=template, add_generation_prompt=True, tokenize=True
            )
        if isinstance(ids, Mapping):  # some tokenizers answer with a BatchEncoding
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    # ------------------------------------------------------------------ inference

    def prefill(self, cache_salt: str | None, prompt_token_ids: Sequence[int]) -> PrefillResult:
        """Bring the session's KV to exactly `prompt_token_ids` and return next-token logits.

        This is the first step of `generate`, exposed so tests (and the lossless check) can
        compare logits. Afterwards the session covers exactly the prompt.
        """
        prompt = check_prompt(prompt_token_ids, 0, self._vocab_size, self._max_model_len)
        with self._lock:
            session = self._session_for(cache_salt)
            logits, cached = self._extend(cache_salt, session, prompt)
            return PrefillResult(
                logits=logits.clone(), prompt_tokens=len(prompt), cached_tokens=cached
            )

    def next_token_logits(
        self, cache_salt: str | None, prompt_token_ids: Sequence[int]
    ) -> torch.Tensor:
        """The logits `generate` would sample its first token from (see `prefill`)."""
        return self.prefill(cache_salt, prompt_token_ids).logits

    def generate(
        self,
        prompt_token_ids: Sequence[int],
        cache_salt: str | None,
        max_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> GenerationResult:
        """Complete a prompt, reusing and then extending the session's KV. `on_token` is
        called with each token as it is sampled (a streaming response sends it at once).

        `cache_salt=None` runs without a session (nothing reused, nothing kept). Greedy when
        `temperature` is 0; otherwise sampled from softmax(logits / temperature) in float32
        with a generator seeded by `seed` (fresh entropy when None).
        """
        check_sampling(max_tokens, temperature)
        prompt = check_prompt(prompt_token_ids, max_tokens, self._vocab_size, self._max_model_len)
        generator: torch.Generator | None = None
        if temperature > 0:
            generator = torch.Generator(device="cpu")
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(int(seed))

        with self._lock:
            session = self._session_for(cache_salt)
            logits, cached = self._extend(cache_salt, session, prompt)
            generated, finish_reason = decode(
                logits,
                lambda scores: self._sample(scores, temperature, generator),
                lambda token: self._forward(cache_salt, session, [token]),
                max_tokens=max_tokens,
                eos=self._eos_ids,
                on_token=on_token,
            )
        text_ids = generated[:-1] if finish_reason == "stop" else generated
        return GenerationResult(
            token_ids=generated,
            text=self.detokenize(text_ids),
            prompt_tokens=len(prompt),
            cached_tokens=cached,
            finish_reason=finish_reason,
        )

    # ------------------------------------------------------------------ KV in and out

    def export_chunks(
        self,
        cache_salt: str,
        num_tokens: int | None = None,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ) -> tuple[list[int], list[bytes]]:
        """The session's KV for its first `num_tokens` tokens, as canonical chunk bytes.

        Returns (token_ids, chunks): chunk i holds tokens [i*chunk_tokens, ...) in the layout
        [2, num_layers, tokens, num_kv_heads*head_dim] (K then V), little-endian, C order, bf16
        as uint16 words. `num_tokens` defaults to every token the session's KV covers.
        """
        check_chunk_tokens(chunk_tokens, REFERENCE_BLOCK_SIZE)
        with self._lock:
            session = self._sessions.require(cache_salt)
            covered = len(session.tokens)
            count = covered if num_tokens is None else num_tokens
            if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= covered:
                raise EngineInputError(
                    f"num_tokens must be in 1..{covered} (the tokens session {cache_salt!r} "
                    f"covers), got {num_tokens!r}"
                )
            token_ids = list(session.tokens[:count])
            kv = self._kv.copy_out(session.cache, count)
        return token_ids, self._kv.to_chunks(kv, chunk_tokens)

    def import_chunks(
        self,
        cache_salt: str,
        token_ids: Sequence[int],
        chunks: Sequence[bytes | bytearray | memoryview],
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ) -> SessionInfo:
        """Make `cache_salt` a session whose KV is exactly the given chunks (a thaw).

        An existing session with that salt is replaced. The next request whose prompt extends
        `token_ids` is served with `cached_tokens == len(token_ids)`.
        """
        check_salt(cache_salt)
        check_chunk_tokens(chunk_tokens, REFERENCE_BLOCK_SIZE)
        tokens = check_token_ids(token_ids, "token_ids", self._vocab_size)
        if len(tokens) > self._max_model_len:
            raise EngineInputError(
                f"{len(tokens)} tokens exceed the model's {self._max_model_len} positions"
            )
        cache = self._kv.to_cache(len(tokens), chunks, chunk_tokens)
        with self._lock:
            session = Session(cache=cache, tokens=tokens)
            self._sessions.store(cache_salt, session)
            return SessionInfo(cache_salt, len(tokens), session.last_active)

    # ------------------------------------------------------------------ sessions

    def list_sessions(self) -> list[SessionInfo]:
        with self._lock:
            return self._sessions.infos()

    def session_tokens(self, cache_salt: str) -> list[int]:
        """The tokens whose KV the session holds (what a freeze of it would store)."""
        with self._lock:
            return list(self._sessions.require(cache_salt).tokens)

    def drop_session(self, cache_salt: str) -> bool:
        """Forget a session and free its KV; False when there was none."""
        with self._lock:
            return self._sessions.drop(cache_salt)

    # ------------------------------------------------------------------ internals

    def _new_cache(self) -> DynamicCache:
        return DynamicCache(config=self._config)

    def _session_for(self, cache_salt: str | None) -> Session:
        """The salt's session, created empty on first use; a throwaway one for None."""
        if cache_salt is None:
            return Session(cache=self._new_cache())
        check_salt(cache_salt)
        return self._sessions.get_or_create(cache_salt)

    def _extend(
        self, cache_salt: str | None, session: Session, prompt: list[int]
    ) -> tuple[torch.Tensor, int]:
        """Reuse the longest covered prefix of `prompt`, feed the rest in one forward pass."""
        reuse = min(common_prefix(session.tokens, prompt), len(prompt) - 1)
        drop = len(session.tokens) - reuse
        if drop > 0:
            if reuse == 0:
                session.cache = self._new_cache()
            else:
                session.cache.crop(-drop)  # transformers 5: a negative count of tokens to drop
            del session.tokens[reuse:]
        return self._forward(cache_salt, session, prompt[reuse:]), reuse

    @torch.inference_mode()
    def _forward(
        self, cache_salt: str | None, session: Session, new_tokens: list[int]
    ) -> torch.Tensor:
        """Run `new_tokens` over the session's KV in one pass; return the last logits."""
        input_ids = torch.tensor([new_tokens], dtype=torch.long, device=self._device)
        try:
            # Positions default to cache length + arange(len(new_tokens)), which is exactly
            # where these tokens sit; no attention mask is needed for one unpadded sequence.
            output = self._model(
                input_ids=input_ids, cache=session.cache, use_cache=True, logits_to_keep=1
            )
        except BaseException:
            # Some layers may already hold the new tokens' KV: the session is no longer
            # trustworthy, so it goes (a later request starts it afresh).
            if cache_salt is not None:
                self._sessions.discard(cache_salt, session)
            raise
        session.tokens.extend(new_tokens)
        session.last_active = time.time()
        if session.cache.get_seq_length() != len(session.tokens):
            raise RuntimeError("KV cache length and session tokens disagree")
        logits: torch.Tensor = output.logits[0, -1]
        return logits

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
        scores = logits.float().cpu()
        if temperature == 0 or generator is None:
            return int(torch.argmax(scores).item())
        probs = torch.softmax(scores / temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator).item())
