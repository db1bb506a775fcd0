"""Build the tiny random-weight Llama used by the reference engine and the tests.

    python tools/make_tiny_model.py OUT_DIR

Idempotent: a directory already holding this recipe's build is left alone. The implementation
lives in `cwm_server.agent.engines.reference.tiny_model` (tools/ is not installed with the package);
this is only the command-line face, also importable as `tools.make_tiny_model`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cwm_server.agent.engines.reference.tiny_model import (
    RECIPE,
    ensure_tiny_model,
    is_built,
    recipe_digest,
)

__all__ = ["RECIPE", "ensure_tiny_model", "is_built", "main", "recipe_digest"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="directory to build the model into")
    args = parser.parse_args(argv)
    already = is_built(args.out_dir)
    started = time.monotonic()
    path = ensure_tiny_model(args.out_dir)
    from cwm_server.agent.engines.fingerprint import model_fingerprint

    fingerprint = model_fingerprint(path)
    verb = "already built" if already else f"built in {time.monotonic() - started:.1f}s"
    print(f"{path}: {verb}")
    print(f"weights_digest   {fingerprint.weights_digest}")
    print(f"tokenizer_digest {fingerprint.tokenizer_digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
