"""Freeze and thaw of one llama-server slot through the agent's adapter, with the slot
directory on the root disk and on tmpfs, side by side in one run.

    .venv/bin/python tools/bench/llamacpp_slot_dir.py --model GEO8B.gguf --tokens 2048

One llama-server per directory (2 threads, 2 slots): a `--tokens` session is built in slot 0,
then `--repeat` times exported (action=save -> mapped file -> canonical chunks) and imported
into slot 1 (chunks -> mapped slot file -> action=restore), slot 1 erased between rounds.
No manager: this is the agent's own path, the part the slot directory's medium decides.
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
from common import free_port, machine

from cwm_server.agent.engines.llamacpp.launch import LlamaServer, completion
from cwm_server.agent.engines.llamacpp.server_adapter import LlamaServerAdapter


def _erase(url: str, slot: int) -> None:
    request = urllib.request.Request(
        f"{url}/slots/{slot}?action=erase", data=b"{}", headers={"Content-Type": "application/json"}
    )
    urllib.request.urlopen(request, timeout=60).read()


def measure(model: str, base: Path, tokens: int, repeat: int) -> dict[str, Any]:
    server = LlamaServer(
        model, free_port(), base / "slots", base / "server.log", threads=2, ctx_per_slot=tokens + 64
    )
    with server:
        engine = LlamaServerAdapter(server.url, server.slot_dir)
        try:
            rng = np.random.default_rng(1)
            completion(server.url, [int(t) for t in rng.integers(16, 2000, size=tokens)], 0)
            exports, imports = [], []
            for _ in range(repeat):
                t0 = time.perf_counter()
                exported = engine.export_session("slot-0", 256)
                exports.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                engine.import_session("slot-1", exported.token_ids, exported.chunks, 256)
                imports.append(time.perf_counter() - t0)
                completion(server.url, [1], 1, n_predict=1)  # a request: slot 1 is the server's
                _erase(server.url, 1)
            mib = sum(len(c) for c in exported.chunks) / (1 << 20)
        finally:
            engine.close()
    return {
        "mib": round(mib, 1),
        "export_s": [round(x, 3) for x in exports],
        "import_s": [round(x, 3) for x in imports],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="GGUF file")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    result: dict[str, Any] = {"machine": machine(), "tokens": args.tokens}
    for label, root in (("disk", Path(tempfile.gettempdir())), ("tmpfs", Path("/dev/shm"))):
        base = Path(tempfile.mkdtemp(prefix="cwm-slot-dir-", dir=root))
        try:
            result[label] = measure(args.model, base, args.tokens, args.repeat)
        finally:
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
