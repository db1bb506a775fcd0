"""The tiny GGUF builder: byte-identical rebuilds, build stamps that tell stale from good, and
(where llama-cpp-python is installed) a file llama.cpp loads, tokenizes with and runs."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from cwm_server.agent.engines.llamacpp.tiny_gguf import (  # noqa: E402
    DIGEST_KEY,
    RECIPE,
    ensure_tiny_gguf,
    is_built,
    read_recipe_digest,
    recipe_digest,
)

SENTENCE = "The quick brown fox jumps over the lazy dog, and then it sleeps until noon."
PARAGRAPH = (
    "The old library stood at the edge of a quiet town, where the river bent toward the hills. "
    "Every morning a curious student opened its green door, carried a warm cup of tea to the "
    "reading room, and asked the patient keeper for a map of the city. She explained that the "
    "maps were stored in a heavy cabinet near the window, because the sunlight slowly faded "
    "the ink. They counted the drawers together, found the last question written on a broken "
    "clock, and laughed about the strange rules. Eventually the student returned the map, "
    "promised to come back tomorrow, and walked home along the river."
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once for the module (about a second)."""
    return ensure_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_a_rebuild_elsewhere_is_byte_identical(tiny_gguf: Path, tmp_path: Path) -> None:
    again = ensure_tiny_gguf(tmp_path / "deeper" / "again.gguf")
    assert again == (tmp_path / "deeper" / "again.gguf").resolve()
    assert _sha256(again) == _sha256(tiny_gguf)
    assert sorted(p.name for p in again.parent.iterdir()) == ["again.gguf"]  # no temp left


def test_ensure_is_idempotent(tiny_gguf: Path) -> None:
    before = tiny_gguf.stat()
    assert ensure_tiny_gguf(tiny_gguf) == tiny_gguf
    after = tiny_gguf.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_is_built_only_for_this_recipes_build(tiny_gguf: Path, tmp_path: Path) -> None:
    assert is_built(tiny_gguf)
    assert read_recipe_digest(tiny_gguf) == recipe_digest()
    assert not is_built(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    assert not is_built(junk)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[:40])
    assert not is_built(truncated)
    # A well-formed GGUF somebody else wrote: no recipe digest in it.
    foreign = tmp_path / "foreign.gguf"
    writer = gguf.GGUFWriter(foreign, "llama")
    writer.add_string("general.name", "someone else's model")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert read_recipe_digest(foreign) is None
    assert not is_built(foreign)
    assert not is_built(tmp_path)  # a directory is not a build either


def test_a_stale_build_is_rebuilt(tiny_gguf: Path, tmp_path: Path) -> None:
    older: dict[str, Any] = {**RECIPE, "seed": RECIPE["seed"] + 1}
    assert recipe_digest(older) != recipe_digest()
    path = ensure_tiny_gguf(tmp_path / "model.gguf", older)
    assert is_built(path, older)
    assert not is_built(path)
    assert _sha256(path) != _sha256(tiny_gguf)
    assert ensure_tiny_gguf(path) == path
    assert is_built(path) and not is_built(path, older)
    assert _sha256(path) == _sha256(tiny_gguf)


def test_a_foreign_file_is_never_overwritten(tmp_path: Path) -> None:
    precious = tmp_path / "precious.gguf"
    precious.write_bytes(b"GGUF somebody's real model")
    with pytest.raises(FileExistsError):
        ensure_tiny_gguf(precious)
    assert precious.read_bytes() == b"GGUF somebody's real model"
    with pytest.raises(ValueError, match=r"\.gguf"):
        ensure_tiny_gguf(tmp_path / "model.bin")


def test_layout_is_llama_cpps_llama(tiny_gguf: Path) -> None:
    reader = gguf.GGUFReader(tiny_gguf)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "llama"
    assert fields[DIGEST_KEY] == recipe_digest()
    assert fields["llama.block_count"] == RECIPE["block_count"]
    assert fields["llama.attention.head_count_kv"] == RECIPE["head_count_kv"]
    assert fields["tokenizer.ggml.model"] == "gpt2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == RECIPE["vocab_size"] == len(set(tokens))
    assert tokens[fields["tokenizer.ggml.bos_token_id"]] == "<|begin_of_text|>"
    assert fields["tokenizer.ggml.add_bos_token"] is True
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 9 * RECIPE["block_count"]
    kv_rows = RECIPE["head_count_kv"] * RECIPE["head_dim"]
    assert list(tensors["blk.3.attn_k.weight"].shape) == [RECIPE["embedding_length"], kv_rows]
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    weights = np.asarray(tensors["output.weight"].data, dtype=np.float32)
    assert np.isfinite(weights).all()
    assert 0.5 * RECIPE["init_std"] < weights.std() < 2 * RECIPE["init_std"]


def test_the_module_imports_without_torch() -> None:
    code = (
        "import sys; import cwm_server.agent.engines.llamacpp.tiny_gguf; "
        "sys.exit(int('torch' in sys.modules))"
    )
    root = Path(__file__).resolve().parents[4]
    env = {**os.environ, "PYTHONPATH": str(root)}
    assert subprocess.run([sys.executable, "-c", code], env=env, cwd=root).returncode == 0


def test_llama_cpp_loads_tokenizes_and_runs_it(tiny_gguf: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(tiny_gguf), n_ctx=512, logits_all=True, verbose=False)
    try:
        assert llm.n_vocab() == RECIPE["vocab_size"]
        ids = llm.tokenize(SENTENCE.encode())
        assert ids[0] == llm.token_bos() and ids.count(llm.token_bos()) == 1
        assert len(ids) > 5
        assert llm.detokenize(ids[1:]).decode() == SENTENCE
        words = len(PARAGRAPH.split())
        paragraph = llm.tokenize(PARAGRAPH.encode(), add_bos=False)
        assert words <= len(paragraph) <= 4 * words
        assert llm.detokenize(paragraph).decode() == PARAGRAPH

        llm.eval(ids[:8])
        logits = np.asarray(llm.scores[:8], dtype=np.float64)
        assert np.isfinite(logits).all()
        assert (logits.std(axis=1) > 1e-3).all()  # not all equal within a position
        assert not np.allclose(logits[-1], logits[-2])  # and the context matters
    finally:
        llm.close()


def test_llama_cpp_splits_text_as_the_trained_tokenizer_does(tiny_gguf: Path) -> None:
    """Guards the `tokenizer.ggml.pre` choice: llama.cpp's pre-tokenizer must be the regex
    the vocabulary was trained with, or merges would apply across the wrong boundaries."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from tokenizers import Tokenizer, models, pre_tokenizers

    fields = {name: f.contents() for name, f in gguf.GGUFReader(tiny_gguf).fields.items()}
    vocab = {text: i for i, text in enumerate(fields["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"]]
    reference = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    llm = llama_cpp.Llama(model_path=str(tiny_gguf), n_ctx=512, verbose=False)
    try:
        for text in (SENTENCE, PARAGRAPH, "In 1999, it's 42 o'clock!\n  def f(x):\n\treturn x"):
            assert llm.tokenize(text.encode(), add_bos=False) == reference.encode(text).ids
    finally:
        llm.close()
