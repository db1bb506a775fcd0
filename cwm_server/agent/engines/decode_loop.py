"""The token loop every in-process engine runs after its prefill (reference, llama.cpp).

Sample a token from the logits, hand it to the caller (a streaming response sends it at
once), stop at an end-of-generation token or at `max_tokens`, else feed the token and sample
from its logits. The last sampled token is never fed: its KV would be computed for nothing,
and the session then covers exactly the tokens whose KV it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TypeVar

Logits = TypeVar("Logits")


def decode(
    logits: Logits,
    sample: Callable[[Logits], int],
    feed: Callable[[int], Logits],
    *,
    max_tokens: int,
    eos: Collection[int],
    on_token: Callable[[int], None] | None = None,
) -> tuple[list[int], str]:
    """The generated tokens and the finish reason: "stop" (an EOS token was sampled, and is
    the last of them) or "length"."""
    generated: list[int] = []
    while True:
        token = sample(logits)
        generated.append(token)
        if on_token is not None:
            on_token(token)
        if token in eos:
            return generated, "stop"
        if len(generated) >= max_tokens:
            return generated, "length"
        logits = feed(token)
