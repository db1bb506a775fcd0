"""What `fingerprint_differences` says when a window meets an engine that would misread it."""

from __future__ import annotations

from cwm_client import pb
from cwm_client.fingerprints import fingerprint_differences


def _fp(**fields: object) -> pb.ModelFingerprint:
    base: dict[str, object] = {
        "model_id": "m",
        "weights_digest": "w" * 64,
        "tokenizer_digest": "t" * 64,
        "kv_dtype": pb.KvDtype.KV_DTYPE_FLOAT16,
        "num_layers": 4,
        "num_kv_heads": 2,
        "head_dim": 32,
        "engine_name": "llama.cpp",
        "engine_version": "llama.cpp b1-0c1e570; kv f16; v_trans 0",
        "block_size": 1,
    }
    return pb.ModelFingerprint(**{**base, **fields})  # type: ignore[arg-type]


def test_equal_fingerprints_and_another_model_id_are_usable() -> None:
    assert fingerprint_differences(_fp(), _fp(model_id="renamed")) == []


def test_an_engine_version_mismatch_names_only_the_parts_that_differ() -> None:
    other = _fp(engine_version="llama.cpp b1-0c1e570; kv f16; v_trans 1")
    assert fingerprint_differences(_fp(), other) == [
        "engine_version: window 'v_trans 0', engine 'v_trans 1'"
    ]


def test_engine_versions_of_other_shapes_are_shown_whole() -> None:
    diffs = fingerprint_differences(_fp(), _fp(engine_version="reference 1"))
    assert diffs == [
        "engine_version: window 'llama.cpp b1-0c1e570; kv f16; v_trans 0', engine 'reference 1'"
    ]


def test_other_fields_are_shown_short() -> None:
    diffs = fingerprint_differences(_fp(), _fp(num_layers=8, weights_digest="x" * 64))
    assert diffs == [
        f"weights_digest: window {'w' * 16}…, engine {'x' * 16}…",
        "num_layers: window 4, engine 8",
    ]
