"""The token loop of the in-process engines: when it stops and what it feeds."""

from __future__ import annotations

from cwm_server.agent.engines.decode_loop import decode


def _run(script: list[int], max_tokens: int) -> tuple[list[int], str, list[int], list[int]]:
    fed: list[int] = []
    seen: list[int] = []
    tokens = iter(script)
    generated, finish = decode(
        0,
        lambda _logits: next(tokens),
        lambda token: fed.append(token) or len(fed),
        max_tokens=max_tokens,
        eos={99},
        on_token=seen.append,
    )
    return generated, finish, fed, seen


def test_an_eos_token_ends_it_and_is_the_last_one_returned() -> None:
    generated, finish, fed, seen = _run([5, 6, 99, 7], max_tokens=10)
    assert (generated, finish) == ([5, 6, 99], "stop")
    assert fed == [5, 6] and seen == [5, 6, 99]  # the EOS token is never fed


def test_max_tokens_ends_it_without_feeding_the_last_token() -> None:
    generated, finish, fed, seen = _run([1, 2, 3, 4], max_tokens=3)
    assert (generated, finish) == ([1, 2, 3], "length")
    assert fed == [1, 2] and seen == [1, 2, 3]
