"""ModelFingerprint of a local Hugging Face model directory.

A window's KV is only meaningful to an engine that would have computed the very same tensors,
so the fingerprint pins everything that decides those bits: the weights and config, the
tokenizer (token ids mean nothing under another vocabulary), the KV dtype and shape, and the
engine with the library versions whose kernels produced the numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

import blake3

from cwm_client import pb

ENGINE_NAME = "reference"
REFERENCE_BLOCK_SIZE = 16

# Files whose bytes are the weights. Index files are included: they decide which shard holds
# which tensor.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json")
_WEIGHT_EXCLUDE = ("training_args.bin", "optimizer.bin", "scheduler.bin")
# Files that decide how text maps to token ids. The chat template is left out on purpose: it
# changes which ids a client sends, not what an id means, so it cannot invalidate stored KV.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
)
# config.json keys that record who saved the file rather than what the model is; dropping
# them lets the same model saved by two transformers releases keep one digest.
_CONFIG_VOLATILE_KEYS = ("transformers_version", "_name_or_path")

STAMP_FILE = "cwm_tiny_model.json"
"""A build stamp a model maker leaves in the model directory (the tiny model's does); its
`model_id` names the model wherever the directory lives. Defined here, not by the maker, so
fingerprinting imports no engine."""

_KV_DTYPES: dict[str, int] = {
    "float32": pb.KvDtype.KV_DTYPE_FLOAT32,
    "float16": pb.KvDtype.KV_DTYPE_FLOAT16,
    "bfloat16": pb.KvDtype.KV_DTYPE_BFLOAT16,
    "float8_e4m3fn": pb.KvDtype.KV_DTYPE_FLOAT8_E4M3,
    "float8_e5m2": pb.KvDtype.KV_DTYPE_FLOAT8_E5M2,
}


def kv_dtype_from_name(name: str) -> int:
    """Map a torch dtype name ("bfloat16", "torch.bfloat16") to the proto KvDtype."""
    key = name.removeprefix("torch.")
    try:
        return _KV_DTYPES[key]
    except KeyError:
        raise ValueError(
            f"unsupported KV dtype {name!r}; expected one of {sorted(_KV_DTYPES)}"
        ) from None


def _hash_files(label: str, items: Iterable[tuple[str, bytes | Path]]) -> str:
    """BLAKE3 over (name, length, bytes) records, so no two file sets can collide by framing."""
    hasher = blake3.blake3()
    hasher.update(f"cwm-{label}-v1\0".encode())
    for name, source in items:
        if isinstance(source, Path):
            size = source.stat().st_size
            hasher.update(f"{name}\0{size}\0".encode())
            with source.open("rb") as handle:
                while piece := handle.read(1 << 20):
                    hasher.update(piece)
        else:
            hasher.update(f"{name}\0{len(source)}\0".encode())
            hasher.update(source)
    return str(hasher.hexdigest())


def _canonical_config(path: Path) -> bytes:
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in _CONFIG_VOLATILE_KEYS:
        config.pop(key, None)
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files of a model directory, sorted by name."""
    return sorted(
        p
        for p in model_dir.iterdir()
        if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES) and p.name not in _WEIGHT_EXCLUDE
    )


def weights_digest(model_dir: str | Path) -> str:
    """Hex BLAKE3 of the canonical config.json and every weight file's bytes, in name order."""
    root = Path(model_dir)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{root} has no config.json")
    files = weight_files(root)
    if not files:
        raise FileNotFoundError(f"{root} has no weight files ({', '.join(_WEIGHT_SUFFIXES)})")
    items: list[tuple[str, bytes | Path]] = [("config.json", _canonical_config(config_path))]
    items.extend((p.name, p) for p in files)
    return _hash_files("weights", items)


def tokenizer_digest(model_dir: str | Path) -> str:
    """Hex BLAKE3 of the tokenizer files present in the directory, in name order."""
    root = Path(model_dir)
    present = sorted(name for name in _TOKENIZER_FILES if (root / name).is_file())
    if not present:
        raise FileNotFoundError(f"{root} has no tokenizer files")
    return _hash_files("tokenizer", [(name, root / name) for name in present])


def engine_version() -> str:
    """cwm, torch and transformers versions: the kernels that produced the KV bits.

    transformers is included as well as torch because it owns the attention and RoPE code; a
    change there can change KV bits with the same torch.
    """
    versions: dict[str, str] = {}
    for dist in ("cwm", "torch", "transformers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "unknown"
    try:
        import torch

        versions["torch"] = str(torch.__version__)  # with the build tag, e.g. 2.13.0+cpu
    except ImportError:
        pass
    return "; ".join(f"{dist} {version}" for dist, version in versions.items())


def _recorded_model_id(root: Path) -> str | None:
    try:
        stamp = json.loads((root / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model_id = stamp.get("model_id") if isinstance(stamp, dict) else None
    return model_id if isinstance(model_id, str) and model_id else None


def model_fingerprint(
    model_dir: str | Path,
    kv_dtype: str | None = None,
    model_id: str | None = None,
    block_size: int = REFERENCE_BLOCK_SIZE,
    engine_name: str = ENGINE_NAME,
) -> pb.ModelFingerprint:
    """The fingerprint of the KV the reference engine computes with the model in `model_dir`.

    `kv_dtype` is the dtype the engine runs in (default: the config's dtype, else float32).
    `model_id` defaults to the name a tiny-model build records (so two builds in different
    directories agree), else the directory name, which is what a person recognises.
    """
    root = Path(model_dir).resolve()
    if model_id is None:
        model_id = _recorded_model_id(root) or root.name
    config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config", config)
    num_heads = int(text["num_attention_heads"])
    num_kv_heads = int(text.get("num_key_value_heads") or num_heads)
    head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // num_heads)
    dtype_name = kv_dtype or text.get("dtype") or text.get("torch_dtype") or "float32"
    return pb.ModelFingerprint(
        model_id=model_id,
        weights_digest=weights_digest(root),
        tokenizer_digest=tokenizer_digest(root),
        kv_dtype=kv_dtype_from_name(str(dtype_name)),  # type: ignore[arg-type]
        num_layers=int(text["num_hidden_layers"]),
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        engine_name=engine_name,
        engine_version=engine_version(),
        block_size=block_size,
    )
