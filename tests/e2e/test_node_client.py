"""Another language: a Node.js client built from proto/cwm/v1 alone (tests/interop) freezes
a window of known bytes, lists it, thaws it and checks the digests, against a real manager;
then this side thaws what Node froze and checks the same digests with the Python SDK.

`make test` installs the npm packages (`npm ci` from the committed package-lock.json) before
pytest runs; run alone, this test does the same on first use.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from cwm_client import WindowClient, digest
from tests.helpers import ROOT, ThreadedManager

INTEROP = ROOT / "tests" / "interop"


@pytest.fixture(scope="module")
def node() -> str:
    executable = shutil.which("node")
    if executable is None:
        pytest.fail("node is not on PATH: the interop test needs Node.js >= 20.19 and npm")
    if not (INTEROP / "node_modules" / ".installed").exists():
        npm = shutil.which("npm")
        assert npm is not None, "npm is not on PATH"
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=INTEROP,
            check=True,
            timeout=300,
        )
        (INTEROP / "node_modules" / ".installed").touch()
    return executable


def test_node_client_freezes_lists_and_thaws(node: str, manager: ThreadedManager) -> None:
    done = subprocess.run(
        [node, str(INTEROP / "interop.mjs"), "--target", manager.target, "--name", "from-node"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["window"] == "from-node"
    assert report["chunks"] == 3 and report["chunks_sent"] == 3
    assert report["bytes_sent"] == report["raw_bytes"] == 300 * 1024
    assert report["thawed_digests"] == report["digests"]
    assert report["thaw_parts"] == 5  # 128 KiB chunks in 64 KiB parts, and the short one
    assert report["not_found_code"] == 5

    # The Python SDK reads the same window: same tokens, same chunk digests, bytes verified.
    with WindowClient(manager.target) as client:
        window = client.get("from-node")
        assert window.fingerprint.engine_name == "node"
        assert window.tags["client"] == "node"
        assert [c.digest.hex() for c in window.chunks] == report["digests"]
        with client.thaw("from-node") as stream:
            assert [digest(c.data).hex() for c in stream] == report["digests"]
        copy = client.get(report["copy"])
        assert [c.digest for c in copy.chunks] == [c.digest for c in window.chunks]
