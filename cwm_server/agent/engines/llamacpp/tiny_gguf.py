"""A tiny random-weight Llama as one GGUF file, for llama.cpp tests and demos.

No model hub is reachable where cwm is built and tested, yet the llama.cpp engine and its
end-to-end checks need a model llama.cpp really loads, with a real tokenizer so that text
prompts become many tokens (and so many KV cells to freeze). This module writes one from
nothing: a 4-layer grouped-query-attention Llama with seeded random f16 weights and a
byte-level BPE tokenizer trained on the same generated corpus as the reference engine's tiny
model (`reference.tiny_model`), so both engines split text alike.

The build is deterministic: no timestamps, one seeded numpy generator drawn in a fixed order,
and a single-threaded tokenizer trainer, so the same recipe gives a byte-identical file (and
so the same GGUF weights digest) on every run and machine with the same numpy/tokenizers
versions. The recipe's digest is stored in the file itself (`cwm.recipe_digest`), so there is
no sidecar to lose or to get out of step; `is_built` reads it from the header with the
standard library alone.

`ensure_tiny_gguf(path)` is idempotent and crash-safe: a build is written under a temporary
name in the target's directory and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cwm_server.agent.engines.llamacpp.gguf_identity import metadata_entries
from cwm_server.agent.engines.reference import tiny_model as _reference

# Bump when anything below changes what gets written: a stale build is then rebuilt.
FORMAT_VERSION = 1
MODEL_NAME = "cwm-tiny-llama-gguf"
DIGEST_KEY = "cwm.recipe_digest"

RECIPE: dict[str, Any] = {
    "format_version": FORMAT_VERSION,
    "architecture": "llama",
    "block_count": 4,
    "embedding_length": 256,
    "head_count": 8,
    "head_count_kv": 2,
    "head_dim": 32,
    "feed_forward_length": 512,
    "vocab_size": 2048,
    "context_length": 8192,
    "rope_freq_base": 10000.0,
    "rms_norm_eps": 1e-5,
    # Matrices in f16 (llama.cpp's MOSTLY_F16 file type); norm weights in f32, as llama.cpp's
    # own converter writes 1-D tensors.
    "weights_dtype": "f16",
    "norms_dtype": "f32",
    # Larger than the usual 0.02 so attention scores are far from uniform and the KV really
    # changes the output (same reasoning as the reference tiny model); logits stay O(1).
    "init_std": 0.06,
    "seed": 20240917,
    "tokenizer": {
        "model": "gpt2",  # llama.cpp's name for byte-level BPE
        # The GPT-2 split regex, which is what the `tokenizers` ByteLevel pre-tokenizer used
        # in training applies; llama.cpp's "default" would split text differently.
        "pre": "gpt-2",
        "corpus": "cwm_server.agent.engines.reference.tiny_model.build_corpus",
        # The reference module bumps its version whenever its corpus changes; recording it
        # here makes such a change a new recipe (and so a rebuild) for this file too.
        "corpus_recipe_version": _reference.RECIPE_VERSION,
        "corpus_sentences": 12000,
        "add_bos": True,
    },
}

BOS_TOKEN = _reference.BOS_TOKEN
EOS_TOKEN = _reference.EOS_TOKEN
PAD_TOKEN = _reference.PAD_TOKEN
EOT_TOKEN = _reference.EOT_TOKEN
SPECIAL_TOKENS = list(_reference.SPECIAL_TOKENS)
CHAT_TEMPLATE = _reference.CHAT_TEMPLATE

# llama.cpp's token types (gguf.TokenType), spelt out so this module needs no gguf to import.
_TOKEN_NORMAL = 1
_TOKEN_CONTROL = 3
_FILE_TYPE_MOSTLY_F16 = 1


def recipe_digest(recipe: dict[str, Any] = RECIPE) -> str:
    """A short identity for a recipe: what the built file records under `DIGEST_KEY`."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def read_recipe_digest(path: Path) -> str | None:
    """The recipe digest a GGUF built here records, or None for any other file.

    Reads only the metadata (the build writes the key second, right after the architecture),
    so checking a multi-GiB foreign model costs a few reads, not a scan.
    """
    try:
        for key, value, _ in metadata_entries(path):
            if key == DIGEST_KEY:
                return value if isinstance(value, str) else None
    except (OSError, ValueError, struct.error):  # GgufError and UnicodeDecodeError included
        return None
    return None


def is_built(path: Path, recipe: dict[str, Any] = RECIPE) -> bool:
    """True when `path` is a complete build of exactly this recipe.

    Complete because a build only ever appears under its real name by an atomic rename.
    """
    return Path(path).is_file() and read_recipe_digest(Path(path)) == recipe_digest(recipe)


def _train_tokenizer(recipe: dict[str, Any]) -> tuple[list[str], list[str], dict[str, int]]:
    """Byte-level BPE trained on the generated corpus: (tokens by id, merges, special ids)."""
    settings = recipe["tokenizer"]
    tokenizer = _reference.train_bpe(
        recipe["vocab_size"], recipe["seed"], settings["corpus_sentences"]
    )

    vocab: dict[str, int] = tokenizer.get_vocab(with_added_tokens=True)
    if len(vocab) != recipe["vocab_size"] or sorted(vocab.values()) != list(range(len(vocab))):
        # Every embedding row must be a real token, or sampling could emit ids that decode to
        # nothing; a smaller vocabulary means the corpus ran out of merges.
        raise RuntimeError(
            f"tokenizer has {len(vocab)} tokens, the model {recipe['vocab_size']}: "
            "make the corpus richer"
        )
    tokens = [""] * len(vocab)
    for text, token_id in vocab.items():
        tokens[token_id] = text
    raw_merges = json.loads(tokenizer.to_str())["model"]["merges"]
    # Older tokenizers releases serialise a merge as "a b", newer ones as ["a", "b"]; byte-level
    # symbols never contain a space, so "a b" is unambiguous for llama.cpp either way.
    merges = [m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in raw_merges]
    specials = {text: vocab[text] for text in SPECIAL_TOKENS}
    return tokens, merges, specials


def _tensors(recipe: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Names and numpy shapes (rows = outputs) in llama.cpp's llama layout, in write order.

    GGUF lists dimensions fastest-first, so a numpy (out, in) matrix is llama.cpp's {in, out}.
    """
    n_embd, n_vocab, n_ff = (
        recipe["embedding_length"],
        recipe["vocab_size"],
        recipe["feed_forward_length"],
    )
    n_q = recipe["head_count"] * recipe["head_dim"]
    n_kv = recipe["head_count_kv"] * recipe["head_dim"]
    shapes: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (n_vocab, n_embd))]
    for i in range(recipe["block_count"]):
        shapes += [
            (f"blk.{i}.attn_norm.weight", (n_embd,)),
            (f"blk.{i}.attn_q.weight", (n_q, n_embd)),
            (f"blk.{i}.attn_k.weight", (n_kv, n_embd)),
            (f"blk.{i}.attn_v.weight", (n_kv, n_embd)),
            (f"blk.{i}.attn_output.weight", (n_embd, n_q)),
            (f"blk.{i}.ffn_norm.weight", (n_embd,)),
            (f"blk.{i}.ffn_gate.weight", (n_ff, n_embd)),
            (f"blk.{i}.ffn_up.weight", (n_ff, n_embd)),
            (f"blk.{i}.ffn_down.weight", (n_embd, n_ff)),
        ]
    shapes += [("output_norm.weight", (n_embd,)), ("output.weight", (n_vocab, n_embd))]
    return shapes


def _write_gguf(out: Path, recipe: dict[str, Any]) -> None:
    """Write the whole model to `out` (which is overwritten)."""
    import gguf

    if recipe["architecture"] != "llama" or recipe["weights_dtype"] != "f16":
        raise ValueError("only f16 llama builds are implemented")
    tokens, merges, specials = _train_tokenizer(recipe)
    settings = recipe["tokenizer"]

    writer = gguf.GGUFWriter(out, recipe["architecture"])  # writes general.architecture first
    writer.add_string(DIGEST_KEY, recipe_digest(recipe))  # second: `is_built` finds it at once
    writer.add_name(MODEL_NAME)
    writer.add_file_type(_FILE_TYPE_MOSTLY_F16)
    writer.add_vocab_size(recipe["vocab_size"])
    writer.add_context_length(recipe["context_length"])
    writer.add_embedding_length(recipe["embedding_length"])
    writer.add_block_count(recipe["block_count"])
    writer.add_feed_forward_length(recipe["feed_forward_length"])
    writer.add_head_count(recipe["head_count"])
    writer.add_head_count_kv(recipe["head_count_kv"])
    writer.add_key_length(recipe["head_dim"])
    writer.add_value_length(recipe["head_dim"])
    writer.add_rope_dimension_count(recipe["head_dim"])
    writer.add_rope_freq_base(recipe["rope_freq_base"])
    writer.add_layer_norm_rms_eps(recipe["rms_norm_eps"])

    writer.add_tokenizer_model(settings["model"])
    writer.add_tokenizer_pre(settings["pre"])
    writer.add_token_list(tokens)
    writer.add_token_types(
        [_TOKEN_CONTROL if text in specials else _TOKEN_NORMAL for text in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(specials[BOS_TOKEN])
    writer.add_eos_token_id(specials[EOS_TOKEN])
    writer.add_eot_token_id(specials[EOT_TOKEN])
    writer.add_pad_token_id(specials[PAD_TOKEN])
    writer.add_add_bos_token(bool(settings["add_bos"]))
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    # One generator drawn in the (fixed) write order: tensor i's values depend only on the seed
    # and the shapes before it. float32 draws, then one IEEE rounding to f16.
    rng = np.random.default_rng(recipe["seed"])
    for name, shape in _tensors(recipe):
        if len(shape) == 1:  # RMS-norm gains: identity, as a freshly initialised Llama has
            writer.add_tensor(name, np.ones(shape, dtype=np.float32))
        else:
            values = rng.standard_normal(shape, dtype=np.float32) * np.float32(recipe["init_std"])
            writer.add_tensor(name, values.astype(np.float16))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def ensure_tiny_gguf(path: str | os.PathLike[str], recipe: dict[str, Any] = RECIPE) -> Path:
    """Build the tiny GGUF at `path` (a file name ending in .gguf) unless it is already there.

    Returns the resolved path. A file there from an older recipe is replaced; any other file
    is left alone (FileExistsError), so a typo cannot overwrite somebody's real model.
    Concurrent callers each write their own temporary file and rename it into place; the
    builds are byte-identical, so whichever rename lands last changes nothing.
    """
    target = Path(path).resolve()
    if target.suffix != ".gguf":
        raise ValueError(f"{target}: the tiny GGUF's file name must end in .gguf")
    if is_built(target, recipe):
        return target
    if target.exists() and (not target.is_file() or read_recipe_digest(target) is None):
        raise FileExistsError(f"{target} exists and is not a tiny-GGUF build; not touching it")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    staging = Path(name)
    try:
        _write_gguf(staging, recipe)
        staging.chmod(0o644)  # mkstemp's 0600 would stop other users sharing a build
        with staging.open("rb") as handle:  # on disk before the name points at it
            os.fsync(handle.fileno())
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    return target
