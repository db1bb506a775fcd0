"""The vLLM connector's decisions, without vLLM: which staged windows a request may load,
which save orders it accepts, and which staged chunk fills each block it loads."""

from __future__ import annotations

from typing import Any

import pytest

from cwm_server.agent.engines.vllm.transfers import (
    ChunkRef,
    LoadOp,
    blocks_by_chunk,
    check_load_manifest,
    check_save_order,
)

BLOCK = 16
LAYOUT: dict[str, int | str] = {
    "num_layers": 2,
    "num_kv_heads": 2,
    "head_dim": 8,
    "kv_dtype": "bfloat16",
    "block_size": BLOCK,
}
SALT = "session-1"
TOKENS = list(range(100, 164))  # 64 tokens: four blocks


def manifest(**changes: Any) -> dict[str, Any]:
    staged: dict[str, Any] = {
        "cache_salt": SALT,
        "tokens": 48,
        "token_ids": TOKENS[:48],
        "chunk_tokens": 32,
        "chunks": [
            {"file": "chunk-00000.bin", "token_start": 0, "token_count": 32, "digest": "aa"},
            {"file": "chunk-00001.bin", "token_start": 32, "token_count": 16, "digest": "bb"},
        ],
        "layout": dict(LAYOUT),
    }
    staged.update(changes)
    return staged


def test_a_prompt_extending_the_staged_tokens_under_their_salt_loads_them() -> None:
    tokens, chunks = check_load_manifest(manifest(), SALT, TOKENS[:49], LAYOUT, BLOCK)
    assert tokens == 48
    assert chunks == [
        ChunkRef("chunk-00000.bin", 0, 32, "aa"),
        ChunkRef("chunk-00001.bin", 32, 16, "bb"),
    ]


@pytest.mark.parametrize(
    ("prompt", "reason"),
    [
        (TOKENS[:48], "must extend the staged tokens"),
        (TOKENS[:20], "must extend the staged tokens"),
        ([7, *TOKENS[1:49]], "does not start with the staged tokens"),
    ],
)
def test_a_prompt_that_does_not_extend_the_staged_tokens_gets_no_hit(
    prompt: list[int], reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        check_load_manifest(manifest(), SALT, prompt, LAYOUT, BLOCK)


@pytest.mark.parametrize("salt", [None, "", "session-2"])
def test_another_salt_gets_no_hit(salt: str | None) -> None:
    with pytest.raises(ValueError, match="cache_salt is not the staged session's"):
        check_load_manifest(manifest(), salt, TOKENS[:49], LAYOUT, BLOCK)


def test_kv_of_another_shape_is_refused_naming_what_differs() -> None:
    other = dict(LAYOUT, head_dim=16, kv_dtype="float16")
    with pytest.raises(ValueError, match="another shape") as refused:
        check_load_manifest(manifest(layout=other), SALT, TOKENS[:49], LAYOUT, BLOCK)
    assert "head_dim: staged 16, engine 8" in str(refused.value)
    assert "kv_dtype: staged 'float16', engine 'bfloat16'" in str(refused.value)
    assert "num_layers" not in str(refused.value)


@pytest.mark.parametrize("tokens", [0, 40, 64])
def test_only_whole_blocks_within_the_staged_tokens_are_loaded(tokens: int) -> None:
    staged = manifest(tokens=tokens)
    with pytest.raises(ValueError, match="whole blocks"):
        check_load_manifest(staged, SALT, TOKENS, LAYOUT, BLOCK)


@pytest.mark.parametrize("staged", [None, [], "manifest"])
def test_nothing_staged_gets_no_hit(staged: Any) -> None:
    with pytest.raises(ValueError, match="nothing is staged"):
        check_load_manifest(staged, SALT, TOKENS, LAYOUT, BLOCK)


def test_a_malformed_manifest_gets_no_hit() -> None:
    with pytest.raises(ValueError, match="malformed"):
        check_load_manifest(manifest(tokens="48"), SALT, TOKENS, LAYOUT, BLOCK)
    with pytest.raises(ValueError, match="malformed"):
        check_load_manifest(manifest(token_ids=None), SALT, TOKENS, LAYOUT, BLOCK)
    # A chunk list that is not one (a hostile or broken writer) is a refusal, not a crash of
    # vLLM's scheduler step.
    for chunks in (
        [{"file": "chunk-00000.bin"}],
        [None],
        [{"file": "c", "token_start": "x", "token_count": 1, "digest": "d"}],
    ):
        with pytest.raises(ValueError, match="malformed"):
            check_load_manifest(manifest(chunks=chunks), SALT, TOKENS, LAYOUT, BLOCK)


@pytest.mark.parametrize("name", ["../../etc/passwd", "sub/chunk.bin", ".hidden"])
def test_a_chunk_file_outside_the_staged_directory_is_refused(name: str) -> None:
    staged = manifest()
    staged["chunks"][1]["file"] = name
    with pytest.raises(ValueError, match="bad chunk file name"):
        check_load_manifest(staged, SALT, TOKENS[:49], LAYOUT, BLOCK)


def test_a_save_order_for_this_salt_in_whole_blocks_is_accepted() -> None:
    order = {"cache_salt": SALT, "tokens": 48, "chunk_tokens": 32}
    assert check_save_order(order, SALT, 49, BLOCK) == (48, 32)


@pytest.mark.parametrize(
    ("order", "prompt_tokens", "reason"),
    [
        (None, 49, "no save was requested"),
        ({"cache_salt": "other", "tokens": 48, "chunk_tokens": 32}, 49, "cache_salt"),
        ({"cache_salt": SALT, "tokens": 40, "chunk_tokens": 32}, 49, "does not fit blocks"),
        ({"cache_salt": SALT, "tokens": 48, "chunk_tokens": 24}, 49, "does not fit blocks"),
        ({"cache_salt": SALT, "tokens": 48, "chunk_tokens": 0}, 49, "does not fit blocks"),
        ({"cache_salt": SALT, "tokens": 64, "chunk_tokens": 32}, 49, "does not fit blocks"),
        ({"cache_salt": SALT, "tokens": "48", "chunk_tokens": 32}, 49, "does not fit blocks"),
    ],
)
def test_a_save_order_that_does_not_fit_is_refused(
    order: Any, prompt_tokens: int, reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        check_save_order(order, SALT, prompt_tokens, BLOCK)


def test_each_loaded_block_comes_from_the_chunk_that_holds_it() -> None:
    """A load that starts after an already cached block, across chunks of two and one
    blocks: each chunk is read once, for all the blocks it holds."""
    chunks = [
        ChunkRef("a", 0, 32, "da"),
        ChunkRef("b", 32, 32, "db"),
        ChunkRef("c", 64, 16, "dc"),
    ]
    op = LoadOp("op", "/staged", block_ids=[7, 3, 9, 4], first_token=16, chunks=chunks)
    plan = blocks_by_chunk(op, BLOCK)
    assert [(chunk.file, positions) for chunk, positions in plan] == [
        ("a", [(0, 16)]),
        ("b", [(1, 0), (2, 16)]),
        ("c", [(3, 0)]),
    ]


@pytest.mark.parametrize(
    "chunks",
    [
        [ChunkRef("a", 0, 16, "da")],  # the second block is not staged
        [ChunkRef("a", 0, 24, "da"), ChunkRef("b", 24, 8, "db")],  # a block split across two
    ],
)
def test_a_block_no_single_chunk_holds_is_an_error(chunks: list[ChunkRef]) -> None:
    op = LoadOp("op", "/staged", block_ids=[1, 2], first_token=0, chunks=chunks)
    with pytest.raises(ValueError, match=r"no staged chunk holds tokens 16\.\.32"):
        blocks_by_chunk(op, BLOCK)
