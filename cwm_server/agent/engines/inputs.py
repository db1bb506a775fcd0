"""What a caller may ask of an engine that runs in the agent (reference, llama.cpp): the checks
every request, export and import passes before the engine touches a session.

The engine is reached from HTTP clients as well as the agent, so every id, length and salt is
checked here and refused with `EngineInputError` (HTTP 400), never left to fail deep inside
the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

MAX_SALT_LENGTH = 256


class EngineInputError(ValueError):
    """The caller's request is invalid (bad ids, lengths, salt); HTTP maps it to 400."""


def check_token_ids(token_ids: Sequence[int], what: str, vocab_size: int) -> list[int]:
    """`token_ids` as a list of ints, each inside the vocabulary."""
    if isinstance(token_ids, str | bytes):
        raise EngineInputError(f"{what} must be a sequence of token ids")
    tokens = []
    for index, token in enumerate(token_ids):
        if isinstance(token, bool) or not isinstance(token, int | np.integer):
            raise EngineInputError(f"{what}[{index}] is not an integer token id")
        if not 0 <= token < vocab_size:
            raise EngineInputError(
                f"{what}[{index}] = {token} is outside the vocabulary 0..{vocab_size - 1}"
            )
        tokens.append(int(token))
    return tokens


def check_prompt(
    prompt_token_ids: Sequence[int], max_tokens: int, vocab_size: int, max_model_len: int
) -> list[int]:
    """A non-empty prompt that leaves room for `max_tokens` within the model's positions."""
    prompt = check_token_ids(prompt_token_ids, "prompt", vocab_size)
    if not prompt:
        raise EngineInputError("prompt must contain at least one token")
    if len(prompt) + max_tokens > max_model_len:
        raise EngineInputError(
            f"prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceeds the "
            f"model's {max_model_len} positions"
        )
    return prompt


def check_sampling(max_tokens: int, temperature: float) -> None:
    """At least one token to generate, and a temperature softmax can use (0: greedy)."""
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise EngineInputError("max_tokens must be an integer >= 1")
    if not math.isfinite(temperature) or temperature < 0:
        raise EngineInputError("temperature must be a finite number >= 0")


def check_chunk_tokens(chunk_tokens: int, block_size: int) -> None:
    if (
        isinstance(chunk_tokens, bool)
        or not isinstance(chunk_tokens, int)
        or chunk_tokens <= 0
        or chunk_tokens % block_size
    ):
        raise EngineInputError(
            f"chunk_tokens must be a positive multiple of the block size "
            f"{block_size}, got {chunk_tokens!r}"
        )


def check_salt(cache_salt: str) -> None:
    if not isinstance(cache_salt, str) or not 0 < len(cache_salt) <= MAX_SALT_LENGTH:
        raise EngineInputError(
            f"cache_salt must be a non-empty string of at most {MAX_SALT_LENGTH} characters"
        )
