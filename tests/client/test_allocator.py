"""`cwm_client.tune_allocator`: after it, MiB-sized buffers freed and allocated again reuse
mapped pages instead of faulting fresh ones in (counted in minor page faults, not time)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

import cwm_client

PROBE = """
import os, resource, sys
if sys.argv[1] == "tuned":
    from cwm_client import tune_allocator
    assert tune_allocator() is True
data = os.urandom(1 << 20)
for _ in range(20):
    bytes(bytearray(data))  # two live 1 MiB buffers, both freed: what each message does
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    bytes(bytearray(data))
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 200)
"""


def _faults_per_round(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tuned_process_reuses_freed_buffers() -> None:
    assert _faults_per_round("tuned") < 5  # 0 here; untuned glibc faulted ~480 (2 MiB)


def test_exported_and_harmless_to_call_twice() -> None:
    assert cwm_client.tune_allocator is not None
    subprocess.run(
        [sys.executable, "-c", "import cwm_client as c; c.tune_allocator(); c.tune_allocator()"],
        check=True,
    )
