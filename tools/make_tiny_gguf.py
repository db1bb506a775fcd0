"""Build the tiny random-weight Llama GGUF that llama.cpp tests and demos load.

    python tools/make_tiny_gguf.py OUT.gguf

Idempotent: a file already holding this recipe's build is left alone. The implementation
lives in `cwm_server.agent.engines.llamacpp.tiny_gguf` (tools/ is not installed with the
package); this is only the command-line face, also importable as `tools.make_tiny_gguf`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cwm_server.agent.engines.llamacpp.tiny_gguf import (
    RECIPE,
    ensure_tiny_gguf,
    is_built,
    recipe_digest,
)

__all__ = ["RECIPE", "ensure_tiny_gguf", "is_built", "main", "recipe_digest"]


def _blake3_hex(path: Path) -> str:
    import blake3

    hasher = blake3.blake3()
    with path.open("rb") as handle:
        while piece := handle.read(8 << 20):
            hasher.update(piece)
    return str(hasher.hexdigest())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="GGUF file to build (its name ends in .gguf)")
    args = parser.parse_args(argv)
    already = is_built(args.out)
    started = time.monotonic()
    path = ensure_tiny_gguf(args.out)
    verb = "already built" if already else f"built in {time.monotonic() - started:.1f}s"
    print(f"{path}: {verb}")
    print(f"size   {path.stat().st_size} bytes")
    print(f"blake3 {_blake3_hex(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
