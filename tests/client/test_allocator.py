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


ARENA_PROBE = """
import ctypes, os, re, sys, tempfile, threading
if sys.argv[1] == "one":
    from cwm_client.allocator import use_one_malloc_arena
    assert use_one_malloc_arena() is True
else:
    import cwm_client.allocator  # importing it changes nothing
keep = []
barrier = threading.Barrier(4)
def work():
    barrier.wait()  # all four threads alive at once: glibc would give each its own arena
    keep.append(bytearray(64 << 10))
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
fd, path = tempfile.mkstemp()
os.close(fd)
fp = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, fp)
libc.fclose(fp)
print(len(re.findall('<heap nr="', open(path).read())))
os.unlink(path)
"""


def _malloc_arenas(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", ARENA_PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_one_malloc_arena_serves_every_thread() -> None:
    assert _malloc_arenas("one") == 1
    assert _malloc_arenas("default") > 1  # the probe does see per-thread arenas otherwise
