"""A small random-weight Llama with a locally trained byte-level BPE tokenizer.

No model hub is reachable where cwm is built and tested, yet the reference engine and the
end-to-end checks need a real causal LM with a real tokenizer. This module makes one from
nothing, deterministically: the same recipe gives bit-identical files (weights, config and
tokenizer), so a model built on one machine has the same fingerprint as one built elsewhere
with the same torch/transformers/tokenizers versions, and windows frozen on one can thaw on
the other.

`ensure_tiny_model(path)` is idempotent: a directory already holding this recipe's build is
left alone. Builds go to a temporary sibling directory and are renamed into place, so a
crashed or concurrent build never leaves a half-written model where a reader expects one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cwm_server.agent.engines.fingerprint import STAMP_FILE

# Bump when anything below changes what gets written: a stale build is then rebuilt.
RECIPE_VERSION = 1
MODEL_ID = "cwm-tiny-llama"

RECIPE: dict[str, Any] = {
    "recipe_version": RECIPE_VERSION,
    "num_hidden_layers": 4,
    "hidden_size": 256,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 688,
    "vocab_size": 2048,
    "max_position_embeddings": 8192,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "dtype": "bfloat16",
    # Large enough that attention scores are far from uniform, so the KV really matters
    # to the output (with tiny weights every position would look alike).
    "init_std": 0.06,
    "seed": 20240917,
    "corpus_sentences": 12000,
}

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
EOT_TOKEN = "<|eot|>"
HEADER_START = "<|start_header|>"
HEADER_END = "<|end_header|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, EOT_TOKEN, HEADER_START, HEADER_END]

# Llama-3 flavoured, but short. The engine feeds token ids; the template is for clients that
# want to build chat prompts with `apply_chat_template`.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header|>{{ message['role'] }}<|end_header|>\n\n{{ message['content'] }}<|eot|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header|>assistant<|end_header|>\n\n{% endif %}"
)

_SUBJECTS = (
    "the cache",
    "a window",
    "the manager",
    "our agent",
    "the engine",
    "every session",
    "the model",
    "a small llama",
    "the tokenizer",
    "this chunk",
    "the storage tier",
    "an operator",
    "the user",
    "a tenant",
    "the scheduler",
    "each layer",
    "the server",
    "my colleague",
    "the old machine",
    "a curious student",
    "the river",
    "a quiet town",
    "the north wind",
    "her brother",
    "the library",
    "a red fox",
    "the committee",
)
_VERBS = (
    "stores",
    "freezes",
    "thaws",
    "reads",
    "writes",
    "verifies",
    "compresses",
    "moves",
    "clones",
    "deletes",
    "remembers",
    "forgets",
    "computes",
    "returns",
    "accepts",
    "rejects",
    "counts",
    "carries",
    "follows",
    "watches",
    "builds",
    "opens",
    "closes",
    "finds",
    "explains",
    "describes",
    "measures",
    "sends",
    "receives",
    "keeps",
    "loses",
    "repairs",
)
_OBJECTS = (
    "the tokens",
    "a digest",
    "the keys and values",
    "every block",
    "the prompt",
    "a long story",
    "the first layer",
    "three windows",
    "the disk",
    "a map of the city",
    "the logits",
    "a warm cup of tea",
    "the morning news",
    "its own shadow",
    "the letters",
    "a broken clock",
    "the last question",
    "two hundred bytes",
    "the green door",
    "an old song",
    "the quarterly report",
    "a set of rules",
    "the final answer",
)
_ADJECTIVES = (
    "quick",
    "slow",
    "careful",
    "durable",
    "silent",
    "bright",
    "heavy",
    "light",
    "exact",
    "lossless",
    "strange",
    "simple",
    "ancient",
    "modern",
    "small",
    "large",
    "gentle",
    "sharp",
    "distant",
    "familiar",
    "patient",
    "busy",
    "empty",
    "full",
    "honest",
)
_ADVERBS = (
    "quickly",
    "slowly",
    "carefully",
    "quietly",
    "again",
    "never",
    "always",
    "often",
    "rarely",
    "exactly",
    "suddenly",
    "gladly",
    "eventually",
    "twice",
    "today",
    "yesterday",
)
_CONNECTORS = (
    "and then",
    "but",
    "because",
    "so",
    "while",
    "although",
    "before",
    "after",
    "until",
    "whenever",
    "as soon as",
    "even though",
    "since",
)
_QUESTIONS = (
    "Why does {s} {v} {o}?",
    "When will {s} {v} {o}?",
    "How often does {s} {v} {o}?",
    "Can {s} {v} {o} {adv}?",
    "Who {v} {o} when {s} is {adj}?",
)
_CODE = (
    "def {name}(x):\n    return x * {n}\n",
    "for i in range({n}):\n    total += i\n",
    "if {name} is None:\n    raise ValueError('{name}')\n",
    '{{"{name}": {n}, "ok": true}}\n',
    "SELECT {name} FROM windows WHERE size > {n};\n",
)
_NAMES = ("alpha", "beta", "gamma", "delta", "chunk", "window", "token", "layer", "digest")
_SYLLABLES = (
    "ka",
    "to",
    "ren",
    "mi",
    "sol",
    "va",
    "dor",
    "el",
    "an",
    "ith",
    "qu",
    "or",
    "bel",
    "un",
    "zar",
    "fen",
    "li",
    "mar",
    "ost",
    "ra",
    "ny",
    "gal",
    "ver",
    "is",
    "hu",
    "tam",
    "cor",
    "ex",
)


def _pseudo_word(rng: random.Random) -> str:
    """A made-up name: gives BPE enough distinct material to fill the whole vocabulary."""
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))


def _sentence(rng: random.Random) -> str:
    """One English-ish sentence, question, list or code snippet."""
    s, v, o = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)
    adj, adv = rng.choice(_ADJECTIVES), rng.choice(_ADVERBS)
    kind = rng.random()
    if kind < 0.55:
        text = f"{s} {adv} {v} {o}"
        if rng.random() < 0.5:
            s2, v2, o2 = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)
            text += f", {rng.choice(_CONNECTORS)} {s2} {v2} the {adj} {o2.split()[-1]}"
        return text[0].upper() + text[1:] + rng.choice((".", ".", ".", "!", ";"))
    if kind < 0.7:
        q = rng.choice(_QUESTIONS).format(s=s, v=v.rstrip("s"), o=o, adv=adv, adj=adj)
        return q[0].upper() + q[1:]
    if kind < 0.82:
        n = rng.randint(0, 99999)
        return f"In {1900 + n % 125}, {s} {v} {n} of {o} at {n % 24}:{n % 60:02d}."
    if kind < 0.88:
        place, person = _pseudo_word(rng).capitalize(), _pseudo_word(rng).capitalize()
        return f"{person} of {place} {v} {o} near the {adj} {_pseudo_word(rng)}."
    if kind < 0.94:
        return rng.choice(_CODE).format(name=rng.choice(_NAMES), n=rng.randint(1, 512))
    items = ", ".join(rng.choice(_ADJECTIVES) for _ in range(rng.randint(2, 5)))
    return f"- {adj.capitalize()} things: {items}.\n"


def build_corpus(seed: int, sentences: int) -> list[str]:
    """Deterministic training text: paragraphs of a few sentences each."""
    rng = random.Random(seed)
    paragraphs: list[str] = []
    current: list[str] = []
    for _ in range(sentences):
        current.append(_sentence(rng))
        if rng.random() < 0.2:
            paragraphs.append(" ".join(current) + "\n")
            current = []
    if current:
        paragraphs.append(" ".join(current) + "\n")
    return paragraphs


def recipe_digest(recipe: dict[str, Any] = RECIPE) -> str:
    """A short identity for a recipe: what the stamp file records."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def is_built(path: Path, recipe: dict[str, Any] = RECIPE) -> bool:
    """True when `path` holds a complete build of exactly this recipe."""
    stamp = path / STAMP_FILE
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    if recorded.get("recipe_digest") != recipe_digest(recipe):
        return False
    return all((path / name).is_file() for name in recorded.get("files", []))


def train_bpe(vocab_size: int, seed: int, sentences: int) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` trained on `build_corpus(seed, sentences)`,
    single-threaded for determinism; the vocabulary both tiny models (this one and the tiny
    GGUF) share, so both engines split text alike."""
    # The tokenizers trainer parallelises word counting; ties in merge selection are broken
    # deterministically, but one thread removes any doubt at a cost of well under a second.
    # Must be set before rayon first starts.
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols, so any UTF-8 text tokenizes (no unknown token is needed).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = build_corpus(seed, sentences)
    tokenizer.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    return tokenizer


def _train_tokenizer(recipe: dict[str, Any]) -> Any:
    """The reference model's tokenizer: `train_bpe` with a byte-level decoder and BOS."""
    from tokenizers import decoders, processors

    tokenizer = train_bpe(recipe["vocab_size"], recipe["seed"], recipe["corpus_sentences"])
    tokenizer.decoder = decoders.ByteLevel()
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # Prepend BOS like Llama does, so text prompts over HTTP start the way chat prompts do.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tokenizer


def _build_into(out: Path, recipe: dict[str, Any]) -> list[str]:
    """Write model + tokenizer into the empty directory `out`; return the files written."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # a build is a few seconds; bars only clutter test logs

    raw_tokenizer = _train_tokenizer(recipe)
    if raw_tokenizer.get_vocab_size() != recipe["vocab_size"]:
        # Every embedding row must be a real token, or sampling could emit ids that decode to
        # nothing; a smaller vocabulary means the corpus ran out of merges.
        raise RuntimeError(
            f"tokenizer has {raw_tokenizer.get_vocab_size()} tokens, the model "
            f"{recipe['vocab_size']}: make the corpus richer"
        )
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=raw_tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[EOT_TOKEN, HEADER_START, HEADER_END],
        model_max_length=recipe["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE

    config = LlamaConfig(
        vocab_size=recipe["vocab_size"],
        hidden_size=recipe["hidden_size"],
        intermediate_size=recipe["intermediate_size"],
        num_hidden_layers=recipe["num_hidden_layers"],
        num_attention_heads=recipe["num_attention_heads"],
        num_key_value_heads=recipe["num_key_value_heads"],
        head_dim=recipe["head_dim"],
        max_position_embeddings=recipe["max_position_embeddings"],
        rms_norm_eps=recipe["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": recipe["rope_theta"]},
        bos_token_id=raw_tokenizer.token_to_id(BOS_TOKEN),
        eos_token_id=[raw_tokenizer.token_to_id(EOS_TOKEN), raw_tokenizer.token_to_id(EOT_TOKEN)],
        pad_token_id=raw_tokenizer.token_to_id(PAD_TOKEN),
        tie_word_embeddings=False,
        dtype=recipe["dtype"],
    )

    model = LlamaForCausalLM(config)
    # Our own init, parameter by parameter in name order from one seeded generator: it does not
    # depend on how transformers' default initialiser changes between releases.
    generator = torch.Generator(device="cpu").manual_seed(recipe["seed"])
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                values = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                param.copy_(values * recipe["init_std"])
    model = model.to(getattr(torch, recipe["dtype"]))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    for name in files:  # mkstemp-style 0600 files would stop other users sharing a build
        (out / name).chmod(0o644)
    return files


def ensure_tiny_model(path: str | os.PathLike[str], recipe: dict[str, Any] = RECIPE) -> Path:
    """Build the tiny model into `path` unless it already holds this recipe's build.

    Returns the model directory, ready for `from_pretrained`. Safe against concurrent callers:
    each builds in its own temporary sibling and the first rename wins.
    """
    target = Path(path).resolve()
    if is_built(target, recipe):
        return target
    # Only ever replace a directory we stamped (a stale build) or an empty one, so a typo in
    # the path cannot delete somebody's real model.
    if target.is_dir() and any(target.iterdir()) and not (target / STAMP_FILE).exists():
        raise FileExistsError(f"{target} exists and is not a tiny-model build; not touching it")
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-", dir=target.parent))
    try:
        files = _build_into(staging, recipe)
        stamp = {
            "model_id": MODEL_ID,
            "recipe_digest": recipe_digest(recipe),
            "recipe": recipe,
            "files": files,
        }
        (staging / STAMP_FILE).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
        staging.chmod(0o755)
        if is_built(target, recipe):  # a concurrent builder finished first
            return target
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)  # stale build of an older recipe
        try:
            os.replace(staging, target)
        except OSError:
            # Another builder renamed its build in between; fine if it is this recipe's.
            if not is_built(target, recipe):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
