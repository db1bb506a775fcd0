"""A GGUF model's fingerprint, read from the file with the standard library."""

from __future__ import annotations

from pathlib import Path

import pytest

from cwm_client import pb
from cwm_server.agent.engines.llamacpp.gguf_identity import GgufError, GgufModel
from cwm_server.agent.engines.llamacpp.state_format import GGML_TYPE_BF16, GGML_TYPE_F16
from cwm_server.agent.engines.llamacpp.tiny_gguf import RECIPE, ensure_tiny_gguf


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("gguf")
    other = {**RECIPE, "init_std": 0.05}  # other weights, the same tokenizer
    return ensure_tiny_gguf(base / "a.gguf"), ensure_tiny_gguf(base / "b.gguf", recipe=other)


def test_the_shape_and_names_come_from_the_metadata(builds: tuple[Path, Path]) -> None:
    model = GgufModel.load(builds[0])
    assert (model.num_layers, model.num_kv_heads, model.head_dim) == (4, 2, 32)
    assert model.name == "cwm-tiny-llama-gguf" and model.sliding_window == 0
    fp = model.fingerprint("llama.cpp", "b1-0c1e570", GGML_TYPE_F16, v_trans=True)
    assert fp.kv_dtype == pb.KvDtype.KV_DTYPE_FLOAT16 and fp.block_size == 1
    assert fp.engine_version == "llama.cpp b1-0c1e570; kv f16; v_trans 1"
    bf16 = model.fingerprint("llama.cpp", "b1-0c1e570", GGML_TYPE_BF16, v_trans=False)
    assert bf16.kv_dtype == pb.KvDtype.KV_DTYPE_BFLOAT16


def test_other_weights_change_the_weights_digest_but_not_the_tokenizer_digest(
    builds: tuple[Path, Path],
) -> None:
    a, b = (GgufModel.load(path) for path in builds)
    assert a.weights_digest != b.weights_digest
    assert a.tokenizer_digest == b.tokenizer_digest
    assert GgufModel.load(builds[0]).weights_digest == a.weights_digest  # stable


@pytest.mark.parametrize("damage", ["not-gguf", "truncated"])
def test_a_file_that_is_not_a_whole_gguf_header_is_refused(
    builds: tuple[Path, Path], tmp_path: Path, damage: str
) -> None:
    path = tmp_path / "bad.gguf"
    data = builds[0].read_bytes()
    path.write_bytes(b"PK\x03\x04" + data[4:] if damage == "not-gguf" else data[:200])
    with pytest.raises(GgufError):
        GgufModel.load(path)
