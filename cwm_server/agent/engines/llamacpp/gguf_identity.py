"""The fingerprint of KV that llama.cpp computes with a GGUF model.

A GGUF file holds the weights, the hyper-parameters and the tokenizer in one file, so its
digest pins all three; the tokenizer digest is taken over the `tokenizer.*` metadata alone,
so two quantisations of one model (same vocabulary, other weights) are told apart by their
weights but agree on what a token id means. The engine version pins what decides the bits
besides the model: llama.cpp's build (the state format and the kernels), the KV element type
and whether V is stored transposed, which is llama.cpp's tell for flash attention being off:
the attention kernel changes every later layer's input, so KV computed with flash attention on
and off differ even for the same tokens.

The metadata is read here with the standard library (the header is a short run of typed
key/value pairs), so an agent beside llama-server needs neither the `gguf` package nor numpy
to fingerprint its model.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import blake3

from cwm_client import pb
from cwm_server.agent.engines.llamacpp.state_format import (
    GGML_TYPE_BF16,
    GGML_TYPE_F16,
    GGML_TYPE_F32,
    GGML_TYPE_NAMES,
)

GGUF_MAGIC = b"GGUF"
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9
MAX_METADATA_ENTRIES = 1 << 20

KV_DTYPES = {
    GGML_TYPE_F32: pb.KvDtype.KV_DTYPE_FLOAT32,
    GGML_TYPE_F16: pb.KvDtype.KV_DTYPE_FLOAT16,
    GGML_TYPE_BF16: pb.KvDtype.KV_DTYPE_BFLOAT16,
}


class GgufError(ValueError):
    """The file is not a GGUF model this engine can fingerprint."""


def _read(handle: BinaryIO, size: int) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise GgufError("the GGUF header is truncated")
    return data


def _string(handle: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", _read(handle, 8))
    if length > 1 << 30:
        raise GgufError("a GGUF string is implausibly long")
    return _read(handle, length).decode("utf-8", errors="replace")


def _value(handle: BinaryIO, kind: int) -> Any:
    if kind in _SCALARS:
        fmt = "<" + _SCALARS[kind]
        return struct.unpack(fmt, _read(handle, struct.calcsize(fmt)))[0]
    if kind == _STRING:
        return _string(handle)
    if kind == _ARRAY:
        item_kind, count = struct.unpack("<IQ", _read(handle, 12))
        if count > 1 << 28:
            raise GgufError("a GGUF array is implausibly long")
        if item_kind in _SCALARS:
            fmt = "<" + _SCALARS[item_kind]
            return list(
                struct.unpack(f"<{count}{fmt[1]}", _read(handle, count * struct.calcsize(fmt)))
            )
        return [_value(handle, item_kind) for _ in range(count)]
    raise GgufError(f"unknown GGUF value type {kind}")


def metadata_entries(path: Path) -> Iterator[tuple[str, Any, bytes]]:
    """The GGUF's key/value metadata in file order: key, value and the entry's raw bytes.
    Lazy, so a caller looking for one early key reads only up to it."""
    with path.open("rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise GgufError(f"{path} is not a GGUF file")
        version, _tensors, entries = struct.unpack("<IQQ", _read(handle, 20))
        if version < 2 or entries > MAX_METADATA_ENTRIES:
            raise GgufError(f"{path}: GGUF version {version} with {entries} entries")
        for _ in range(entries):
            start = handle.tell()
            key = _string(handle)
            (kind,) = struct.unpack("<I", _read(handle, 4))
            value = _value(handle, kind)
            end = handle.tell()
            handle.seek(start)
            raw = handle.read(end - start)
            yield key, value, raw


def read_metadata(path: Path) -> tuple[dict[str, Any], bytes]:
    """The GGUF's key/value metadata, and the raw bytes of its `tokenizer.*` entries."""
    metadata: dict[str, Any] = {}
    tokenizer = bytearray()
    for key, value, raw in metadata_entries(path):
        metadata[key] = value
        if key.startswith("tokenizer."):
            tokenizer += raw
    return metadata, bytes(tokenizer)


def file_digest(path: Path) -> str:
    hasher = blake3.blake3()
    hasher.update(b"cwm-gguf-v1\0")
    with path.open("rb") as handle:
        while piece := handle.read(8 << 20):
            hasher.update(piece)
    return str(hasher.hexdigest())


@dataclass(frozen=True)
class GgufModel:
    """What the fingerprint needs from a GGUF file."""

    path: Path
    name: str
    weights_digest: str
    tokenizer_digest: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int

    @classmethod
    def load(cls, path: str | Path) -> GgufModel:
        file = Path(path).resolve()
        metadata, tokenizer = read_metadata(file)
        arch = metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GgufError(f"{file} has no general.architecture")

        def number(key: str, default: int | None = None) -> int:
            value = metadata.get(f"{arch}.{key}", default)
            if isinstance(value, list):  # per-layer counts: they must agree to be one cache
                if len(set(value)) != 1:
                    raise GgufError(
                        f"{file}: {arch}.{key} differs between layers ({sorted(set(value))}); "
                        "models whose layers have different KV shapes cannot be frozen yet"
                    )
                value = value[0]
            if not isinstance(value, int):
                raise GgufError(f"{file} has no {arch}.{key}")
            return value

        heads = number("attention.head_count")
        head_dim = number("attention.key_length", number("embedding_length") // max(1, heads))
        if number("attention.value_length", head_dim) != head_dim:
            raise GgufError(f"{file}: K and V heads differ in size; not supported")
        return cls(
            path=file,
            name=str(metadata.get("general.name") or file.stem),
            weights_digest=file_digest(file),
            tokenizer_digest=str(blake3.blake3(b"cwm-gguf-tokenizer-v1\0" + tokenizer).hexdigest()),
            num_layers=number("block_count"),
            num_kv_heads=number("attention.head_count_kv", heads),
            head_dim=head_dim,
            sliding_window=number("attention.sliding_window", 0),
        )

    def fingerprint(
        self, engine_name: str, build: str, kv_type: int, v_trans: bool
    ) -> pb.ModelFingerprint:
        """`build` names the llama.cpp that runs the model (its build number and commit)."""
        version = f"llama.cpp {build}; kv {GGML_TYPE_NAMES[kv_type]}; v_trans {int(v_trans)}"
        return pb.ModelFingerprint(
            model_id=self.name,
            weights_digest=self.weights_digest,
            tokenizer_digest=self.tokenizer_digest,
            kv_dtype=KV_DTYPES[kv_type],  # type: ignore[arg-type]
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            engine_name=engine_name,
            engine_version=version,
            block_size=1,
        )
