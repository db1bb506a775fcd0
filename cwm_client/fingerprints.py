"""Which fingerprint fields must agree for KV to be usable, and how to say what differs."""

from __future__ import annotations

from cwm_client import pb

# model_id is a label (two nodes may name the same weights differently); everything that
# changes the KV's bytes or meaning must match.
MATCHED_FIELDS = (
    "weights_digest",
    "tokenizer_digest",
    "kv_dtype",
    "num_layers",
    "num_kv_heads",
    "head_dim",
    "engine_name",
    "engine_version",
    "block_size",
)


def _shown(fp: pb.ModelFingerprint, field: str) -> str:
    value = getattr(fp, field)
    if field == "kv_dtype":
        return pb.KvDtype.Name(value)
    text = str(value)
    return text[:16] + "…" if len(text) > 16 else text


def _version_parts(window: str, engine: str) -> tuple[str, str]:
    """The parts of two engine versions ("; "-separated: library versions, KV layout) that
    differ, so a mismatch names what changed ("v_trans 1" vs "v_trans 0") instead of a
    shared prefix cut short."""
    ours, theirs = window.split("; "), engine.split("; ")
    if len(ours) == len(theirs) and len(ours) > 1:
        differing = [(a, b) for a, b in zip(ours, theirs, strict=True) if a != b]
        return "; ".join(a for a, _ in differing), "; ".join(b for _, b in differing)
    return window, engine


def fingerprint_differences(window: pb.ModelFingerprint, engine: pb.ModelFingerprint) -> list[str]:
    """Human-readable differences, e.g. "num_layers: window 4, engine 8"; empty if usable."""
    out = []
    for field in MATCHED_FIELDS:
        if getattr(window, field) == getattr(engine, field):
            continue
        if field == "engine_version":
            ours, theirs = _version_parts(window.engine_version, engine.engine_version)
            out.append(f"{field}: window {ours!r}, engine {theirs!r}")
        else:
            out.append(f"{field}: window {_shown(window, field)}, engine {_shown(engine, field)}")
    return out
