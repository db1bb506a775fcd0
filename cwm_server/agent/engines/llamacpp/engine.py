"""llama.cpp in the agent's process (llama-cpp-python's bindings), with sessions by cache_salt.

One llama.cpp context runs every session: the session a request names is swapped into the
context's sequence 0 and the one there before is kept as its sequence state blob (the bytes
`llama_state_seq_get_data` gives, which `state_format` reads), so a session costs host memory
only for its KV and any number of them share one context. A freeze of a session parses its
blob into canonical chunks; a thaw builds a blob from the chunks in this context's layout and
loads it at once, so a window llama.cpp would refuse fails the thaw instead of the first
request.

Requests reuse the session's longest common prefix with the prompt, never the whole prompt:
the last prompt token is always recomputed, so the first token's logits come from the same
computation on an engine that thawed the session as on the one that built it.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import llama_cpp as lc
import numpy as np

from cwm_client import pb
from cwm_server.agent.engines.base import EngineSession
from cwm_server.agent.engines.decode_loop import decode
from cwm_server.agent.engines.inputs import (
    EngineInputError,
    check_prompt,
    check_salt,
    check_sampling,
    check_token_ids,
)
from cwm_server.agent.engines.llamacpp.gguf_identity import GgufModel
from cwm_server.agent.engines.llamacpp.state_format import (
    StateFormatError,
    StateLayout,
    StateWriter,
    parse_seq_state,
    split_chunks,
    state_size,
    unwrap_memory_state,
    wrap_memory_state,
)
from cwm_server.agent.engines.openai_http import GenerationResult

ENGINE_NAME = "llama.cpp"
DEFAULT_MAX_SESSIONS = 64
_FLASH_ATTN = {None: -1, False: 0, True: 1}  # llama_flash_attn_type: auto, disabled, enabled
_SEQ = 0


@dataclass
class _Parked:
    """A session not in the context: its tokens and its sequence state, as
    `llama_state_seq_get_data` gives it (header included)."""

    tokens: list[int]
    blob: bytes
    last_active: float


@lc.llama_log_callback  # type: ignore[misc]
def _drop_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp logs every load to stderr; the agent's own logs say what matters. A
    module-level callback: llama.cpp keeps the pointer for the life of the process."""
    return None


def _quiet_logs() -> None:
    lc.llama_log_set(_drop_log, ctypes.c_void_p(0))


def bindings_version() -> str:
    try:
        return f"llama-cpp-python {metadata.version('llama_cpp_python')}"
    except metadata.PackageNotFoundError:
        return f"llama-cpp-python {getattr(lc, '__version__', 'unknown')}"


class LlamaCppEngine:
    """A GGUF model served by llama.cpp in this process (see the module docstring)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_ctx: int = 8192,
        flash_attn: bool | None = None,
        n_batch: int = 512,
        n_threads: int | None = None,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
    ) -> None:
        self.model = GgufModel.load(model_path)
        _quiet_logs()
        lc.llama_backend_init()
        model_params = lc.llama_model_default_params()
        self._model = lc.llama_model_load_from_file(str(self.model.path).encode(), model_params)
        if not self._model:
            raise EngineInputError(f"llama.cpp could not load {self.model.path}")
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = 1
        params.flash_attn_type = _FLASH_ATTN[flash_attn]
        if n_threads:
            params.n_threads = params.n_threads_batch = n_threads
        self._ctx = lc.llama_init_from_model(self._model, params)
        if not self._ctx:
            lc.llama_model_free(self._model)
            raise EngineInputError(f"llama.cpp could not make a context for {self.model.path}")
        self._vocab = lc.llama_model_get_vocab(self._model)
        self._memory = lc.llama_get_memory(self._ctx)
        self._n_vocab = int(lc.llama_vocab_n_tokens(self._vocab))
        self._n_ctx = int(lc.llama_n_ctx(self._ctx))
        self._n_batch = n_batch
        self._batch = lc.llama_batch_init(n_batch, 0, 1)
        self._eos = frozenset(
            t for t in range(self._n_vocab) if lc.llama_vocab_is_eog(self._vocab, t)
        )
        self._max_sessions = max_sessions
        self._lock = threading.RLock()
        self._active: str | None = None
        self._active_tokens: list[int] = []
        self._active_since = time.time()
        self._parked: OrderedDict[str, _Parked] = OrderedDict()
        self.layout = self._probe_layout()
        self._fingerprint = self.model.fingerprint(
            ENGINE_NAME, bindings_version(), self.layout.kv_type, self.layout.v_trans
        )

    def close(self) -> None:
        with self._lock:
            if self._ctx:
                lc.llama_batch_free(self._batch)
                lc.llama_free(self._ctx)
                lc.llama_model_free(self._model)
                self._ctx = None

    # -- identity -----------------------------------------------------------------------

    @property
    def fingerprint(self) -> pb.ModelFingerprint:
        return self._fingerprint

    @property
    def model_id(self) -> str:
        return self.model.name

    @property
    def max_model_len(self) -> int:
        return self._n_ctx

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    # -- text ----------------------------------------------------------------------------

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        data = text.encode()
        size = len(data) + 8
        while True:
            buffer = (lc.llama_token * size)()
            count = lc.llama_tokenize(self._vocab, data, len(data), buffer, size, True, special)
            if count >= 0:
                return list(buffer[:count])
            size = -count

    def detokenize(self, token_ids: Sequence[int]) -> str:
        tokens = (lc.llama_token * max(1, len(token_ids)))(*token_ids)
        size = 8 * len(token_ids) + 16
        while True:
            buffer = ctypes.create_string_buffer(size)
            count = lc.llama_detokenize(
                self._vocab, tokens, len(token_ids), buffer, size, True, False
            )
            if count >= 0:
                return buffer.raw[:count].decode("utf-8", errors="replace")
            size = -count

    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        template = lc.llama_model_chat_template(self._model, None) or b"chatml"
        array = (lc.llama_chat_message * len(messages))()
        keep = []
        for slot, message in zip(array, messages, strict=True):
            role, content = message["role"].encode(), message["content"].encode()
            keep += [role, content]
            slot.role, slot.content = role, content
        size = 2 * sum(len(m["content"]) + len(m["role"]) + 16 for m in messages) + 256
        while True:
            buffer = ctypes.create_string_buffer(size)
            count = lc.llama_chat_apply_template(template, array, len(messages), True, buffer, size)
            if count < 0:
                raise EngineInputError(
                    "llama.cpp does not recognise this GGUF's chat template (it applies only "
                    "the templates it knows); send the formatted prompt to /v1/completions"
                )
            if count <= size:
                return self.tokenize(buffer.raw[:count].decode(errors="replace"), special=True)
            size = count

    # -- generation ---------------------------------------------------------------------

    def generate(
        self,
        prompt_token_ids: Sequence[int],
        cache_salt: str | None,
        max_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> GenerationResult:
        check_sampling(max_tokens, temperature)
        prompt = check_prompt(prompt_token_ids, max_tokens, self._n_vocab, self._n_ctx)
        if cache_salt is not None:
            check_salt(cache_salt)
        rng = np.random.default_rng(seed) if temperature > 0 else None
        with self._lock:
            self._activate(cache_salt)
            try:
                logits, cached = self._extend(prompt)
                generated, finish = decode(
                    logits,
                    lambda scores: self._sample(scores, temperature, rng),
                    lambda token: self._decode([token]),
                    max_tokens=max_tokens,
                    eos=self._eos,
                    on_token=on_token,
                )
            finally:
                if cache_salt is None:
                    self._clear()
        shown = generated[:-1] if finish == "stop" else generated
        return GenerationResult(generated, self.detokenize(shown), len(prompt), cached, finish)

    def next_token_logits(
        self, cache_salt: str | None, prompt_token_ids: Sequence[int]
    ) -> np.ndarray:
        """The logits `generate` samples its first token from; the session then covers the
        prompt exactly."""
        prompt = check_prompt(prompt_token_ids, 0, self._n_vocab, self._n_ctx)
        with self._lock:
            self._activate(cache_salt)
            try:
                return self._extend(prompt)[0]
            finally:
                if cache_salt is None:
                    self._clear()

    def _extend(self, prompt: list[int]) -> tuple[np.ndarray, int]:
        tokens = self._active_tokens
        limit = min(len(tokens), len(prompt) - 1)
        reuse = next((i for i in range(limit) if tokens[i] != prompt[i]), limit)
        if reuse < len(tokens):
            lc.llama_memory_seq_rm(self._memory, _SEQ, reuse, -1)
            del tokens[reuse:]
        return self._decode(prompt[reuse:]), reuse

    def _decode(self, new_tokens: list[int]) -> np.ndarray:
        """Feed `new_tokens` after the session's, in batches; the last token's logits."""
        batch = self._batch
        for start in range(0, len(new_tokens), self._n_batch):
            piece = new_tokens[start : start + self._n_batch]
            base = len(self._active_tokens)
            batch.n_tokens = len(piece)
            for i, token in enumerate(piece):
                batch.token[i] = token
                batch.pos[i] = base + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = _SEQ
                batch.logits[i] = i == len(piece) - 1
            status = lc.llama_decode(self._ctx, batch)
            if status != 0:
                lc.llama_memory_seq_rm(self._memory, _SEQ, base, -1)
                raise EngineInputError(
                    f"llama.cpp could not evaluate the prompt (llama_decode returned {status}: "
                    "the context is full)"
                )
            self._active_tokens.extend(piece)
        self._active_since = time.time()
        pointer = lc.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self._n_vocab,)).copy()

    @staticmethod
    def _sample(logits: np.ndarray, temperature: float, rng: np.random.Generator | None) -> int:
        if temperature == 0 or rng is None:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / temperature
        probs = np.exp(scaled - scaled.max())
        return int(rng.choice(len(probs), p=probs / probs.sum()))

    # -- sessions -----------------------------------------------------------------------

    def list_sessions(self) -> list[EngineSession]:
        """The sessions, as the agent reports them (session id = cache_salt)."""
        with self._lock:
            held = [(salt, len(p.tokens), p.last_active) for salt, p in self._parked.items()]
            if self._active is not None and self._active_tokens:
                held.append((self._active, len(self._active_tokens), self._active_since))
        return [EngineSession(salt, salt, count, when) for salt, count, when in held]

    def _state(self) -> bytes:
        size = lc.llama_state_seq_get_size(self._ctx, _SEQ)
        buffer = (ctypes.c_uint8 * size)()
        written = lc.llama_state_seq_get_data(self._ctx, buffer, size, _SEQ)
        return bytes(memoryview(buffer)[:written])

    def _clear(self) -> None:
        lc.llama_memory_seq_rm(self._memory, _SEQ, -1, -1)
        self._active, self._active_tokens = None, []

    def _activate(self, cache_salt: str | None) -> None:
        """Make `cache_salt`'s session (new if unknown) the one in the context."""
        if cache_salt is not None and cache_salt == self._active:
            return
        if self._active is not None and self._active_tokens:
            self._park(self._active, self._active_tokens, self._state(), self._active_since)
        self._clear()
        parked = self._parked.pop(cache_salt, None) if cache_salt is not None else None
        if parked is not None:
            self._load(parked.blob)
            self._active_tokens = parked.tokens
            self._active_since = parked.last_active
        self._active = cache_salt

    def _park(self, salt: str, tokens: list[int], blob: bytes, last_active: float) -> None:
        self._parked[salt] = _Parked(tokens, blob, last_active)
        self._parked.move_to_end(salt)
        while len(self._parked) + 1 > self._max_sessions:
            self._parked.popitem(last=False)  # the least recently used goes, as in a server

    def _load(self, blob: bytes | bytearray) -> None:
        array = ctypes.c_uint8 * len(blob)
        buffer = (
            array.from_buffer(blob) if isinstance(blob, bytearray) else array.from_buffer_copy(blob)
        )
        if lc.llama_state_seq_set_data(self._ctx, buffer, len(blob), _SEQ) == 0:
            lc.llama_memory_seq_rm(self._memory, _SEQ, -1, -1)
            raise EngineInputError("llama.cpp refused the sequence state (no room in the context?)")

    def _probe_layout(self) -> StateLayout:
        """V transposed or not (flash attention off or on) and the KV type, read off the state
        of one evaluated token."""
        with self._lock:
            self._decode([lc.llama_vocab_bos(self._vocab) % self._n_vocab])
            try:
                return parse_seq_state(unwrap_memory_state(self._state())).layout
            finally:
                self._clear()

    # -- KV out and in ------------------------------------------------------------------

    def export_chunks(self, cache_salt: str, chunk_tokens: int) -> tuple[list[int], list[bytes]]:
        with self._lock:
            if cache_salt == self._active and self._active_tokens:
                tokens, blob = list(self._active_tokens), self._state()
            elif cache_salt in self._parked:
                parked = self._parked[cache_salt]
                tokens, blob = list(parked.tokens), parked.blob
            else:
                raise KeyError(cache_salt)
        try:
            state = parse_seq_state(unwrap_memory_state(blob))
        except StateFormatError as exc:
            raise EngineInputError(f"the session's state cannot be frozen: {exc}") from None
        if state.token_count != len(tokens):
            raise EngineInputError(
                f"the session lists {len(tokens)} tokens but holds KV for {state.token_count}"
            )
        return tokens, split_chunks(state.kv, chunk_tokens)

    def import_chunks(
        self, cache_salt: str, token_ids: Sequence[int], chunks: Sequence[bytes | memoryview]
    ) -> None:
        check_salt(cache_salt)
        tokens = check_token_ids(token_ids, "token_ids", self._n_vocab)
        if not tokens or len(tokens) > self._n_ctx:
            raise EngineInputError(f"a session holds 1..{self._n_ctx} tokens, not {len(tokens)}")
        width = self.model.num_kv_heads * self.model.head_dim
        layout = StateLayout(1, self.layout.v_trans, self.layout.kv_type)
        header = wrap_memory_state(b"")
        blob = bytearray(
            len(header) + state_size(layout, self.model.num_layers, width, len(tokens))
        )
        blob[: len(header)] = header
        try:  # each chunk copied once, into its places in the state llama.cpp reads
            writer = StateWriter(
                memoryview(blob)[len(header) :], layout, self.model.num_layers, width, len(tokens)
            )
            for chunk in chunks:
                writer.add(chunk)
            writer.check_complete()
        except ValueError as exc:
            raise EngineInputError(str(exc)) from None
        del writer
        with self._lock:
            if cache_salt == self._active:
                self._clear()
            self._parked.pop(cache_salt, None)
            self._activate(None)
            self._load(blob)
            self._active, self._active_tokens = cache_salt, tokens
            self._active_since = time.time()

    def has_session(self, cache_salt: str) -> bool:
        with self._lock:
            return cache_salt in self._parked or (
                cache_salt == self._active and bool(self._active_tokens)
            )
