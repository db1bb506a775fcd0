"""Durability: what a restart, a cancelled stream, a SIGKILL and a flipped bit leave behind,
and copy-on-write clones. Managers that must restart run as `cwm serve` subprocesses with
fsync on (the default)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest

from cwm_client import InMemoryChunk, WindowClient, chunks_from_bytes, pb
from cwm_client._common import CHANNEL_OPTIONS, build_header, freeze_requests
from cwm_client.chunks import ChunkPayload, bytes_per_token, digest
from cwm_client.codecs import BYTEPLANE_ZSTD, RAW
from cwm_client.errors import DataLoss
from cwm_server.manager.tiers.format import HEADER_SIZE
from tests.e2e.test_memory_bounds import CHUNK_TOKENS, seeded_token_ids, seeded_window
from tests.helpers import (
    FINGERPRINT,
    FINGERPRINT_1MIB,
    ManagerProcess,
    ThreadedManager,
    chunk_files,
    eventually,
    synthetic_chunks,
    token_ids,
)

POLL_S = 10.0


def wait_for(condition: Callable[[], bool], timeout: float = POLL_S) -> bool:
    return eventually(condition, timeout)


def chunk_file(data_dir: Path, chunk_digest: bytes, tenant: str = "default") -> Path:
    hexd = chunk_digest.hex()
    return data_dir / "chunks" / tenant / hexd[:2] / hexd


def thaw_all(client: WindowClient, name: str) -> list[bytes]:
    with client.thaw(name) as stream:
        return [chunk.data for chunk in stream]


def names(client: WindowClient) -> list[str]:
    return [w.name for w in client.list()]


@pytest.fixture
def processes() -> Iterator[list[ManagerProcess]]:
    """Collects every ManagerProcess a test starts and stops those still running."""
    started: list[ManagerProcess] = []
    yield started
    for proc in started:
        proc.stop()


def start(processes: list[ManagerProcess], data_dir: Path, *args: str) -> ManagerProcess:
    proc = ManagerProcess(data_dir, ["--log-level", "WARNING", *args])
    processes.append(proc)
    return proc.start()


# -- restart ------------------------------------------------------------------------------


def test_window_survives_a_restart(tmp_path: Path, processes: list[ManagerProcess]) -> None:
    data = tmp_path / "data"
    tokens = 256 * 5 + 33
    chunks = synthetic_chunks(tokens, seed=11)
    ids = token_ids(tokens, seed=11)
    first = start(processes, data)
    with WindowClient(first.target) as client:
        client.freeze(
            "kept", chunks, fingerprint=FINGERPRINT, token_ids=ids, cache_salt="s", pinned=True
        )
    first.kill(signal.SIGTERM)
    assert first.proc is not None and first.proc.returncode == 0

    second = start(processes, data)
    with WindowClient(second.target) as client:
        assert names(client) == ["kept"]
        with client.thaw("kept") as stream:
            assert list(stream.window.token_ids) == ids
            assert stream.window.cache_salt == "s" and stream.window.pinned
            thawed = list(stream)
    assert [c.digest for c in thawed] == [c.digest for c in chunks]
    assert [c.data for c in thawed] == [c.raw for c in chunks]


# -- a freeze that does not finish --------------------------------------------------------


class _Feeder:
    """Freeze requests for `chunks`: the header, then every chunk, then a wait that only
    `release()` ends, so the stream stays open (never half-closed) until the test ends it;
    with `raise_after`, the iterator raises instead of sending that many chunks."""

    def __init__(
        self,
        chunks: Sequence[ChunkPayload],
        *,
        name: str,
        ids: Sequence[int],
        fingerprint: pb.ModelFingerprint,
        raise_after: int | None = None,
    ) -> None:
        self._header = build_header(
            name, chunks, fingerprint=fingerprint, token_ids=ids, chunk_tokens=CHUNK_TOKENS
        )
        self._chunks = chunks
        self._raise_after = raise_after
        self._release = threading.Event()

    def release(self) -> None:
        self._release.set()

    def __iter__(self) -> Iterator[pb.FreezeRequest]:
        sent = 0
        for request in freeze_requests(self._header, self._chunks):
            if request.HasField("chunk"):
                if self._raise_after is not None and sent == self._raise_after:
                    raise RuntimeError("the client gave up")
                sent += 1
            yield request
        self._release.wait(60)


@pytest.mark.parametrize("how", ["cancel", "raise"])
def test_cancelled_freeze_leaves_nothing(manager: ThreadedManager, how: str) -> None:
    data = manager.config.data_dir
    chunks = seeded_window(48, seed=21)
    ids = seeded_token_ids(48)
    feeder = _Feeder(
        chunks,
        name="half",
        ids=ids,
        fingerprint=FINGERPRINT_1MIB,
        raise_after=6 if how == "raise" else None,
    )
    with grpc.insecure_channel(manager.target, options=CHANNEL_OPTIONS) as channel:
        stub = pb.WindowServiceStub(channel)
        future = stub.Freeze.future(iter(feeder))
        try:
            if how == "cancel":
                # Cancel while the manager is storing: some files exist, more are coming.
                assert wait_for(lambda: len(chunk_files(data)) >= 3), "no chunk was stored"
                assert future.cancel()
                with pytest.raises(grpc.FutureCancelledError):
                    future.result(timeout=30)
            else:
                # grpc cancels the call when the request iterator raises; the client's own
                # status for that is UNKNOWN ("Exception iterating requests!").
                with pytest.raises(grpc.RpcError) as failed:
                    future.result(timeout=30)
                assert failed.value.code() == grpc.StatusCode.UNKNOWN
        finally:
            feeder.release()

    # The manager sees the cancel, waits for its running writes and removes their files.
    assert wait_for(lambda: not chunk_files(data)), chunk_files(data)
    assert not list(data.glob("chunks/**/*.tmp"))
    with WindowClient(manager.target) as client:
        assert names(client) == []
        assert len(client.find_missing([c.digest for c in chunks])) == len(chunks)
        # A stream that ended early pins nothing: a full freeze of the same chunks works.
        small = chunks[:8]
        client.freeze(
            "whole", small, fingerprint=FINGERPRINT_1MIB, token_ids=ids[: 8 * CHUNK_TOKENS]
        )
        assert [digest(d) for d in thaw_all(client, "whole")] == [c.digest for c in small]
    assert len(chunk_files(data)) == 8


def test_freeze_cancelled_after_its_last_chunk_is_not_committed(manager: ThreadedManager) -> None:
    """The client sent every chunk but cancelled instead of closing the stream: the manager
    must not commit (grpc.aio ends the request iterator alike for both, so this used to
    commit now and then). Repeated, since it is a race."""
    data = manager.config.data_dir
    for attempt in range(20):
        chunks = synthetic_chunks(256 * 2, seed=100 + attempt)
        ids = token_ids(256 * 2)
        feeder = _Feeder(chunks, name=f"almost-{attempt}", ids=ids, fingerprint=FINGERPRINT)
        # A channel per attempt, closed right after the cancel, as a client that gives up does.
        with grpc.insecure_channel(manager.target, options=CHANNEL_OPTIONS) as channel:
            future = pb.WindowServiceStub(channel).Freeze.future(iter(feeder))
            try:
                assert wait_for(lambda: len(chunk_files(data)) == 2)
                time.sleep(0.002 * (attempt % 4))
                future.cancel()
            finally:
                feeder.release()
        assert wait_for(lambda: not chunk_files(data)), f"attempt {attempt}"
    with WindowClient(manager.target) as client:
        assert names(client) == []


def test_sigkill_mid_freeze_leaves_nothing_after_restart(
    tmp_path: Path, processes: list[ManagerProcess]
) -> None:
    data = tmp_path / "data"
    kept = synthetic_chunks(256 * 3, seed=31)
    kept_ids = token_ids(256 * 3, seed=31)
    first = start(processes, data)
    with WindowClient(first.target) as client:
        client.freeze("committed", kept, fingerprint=FINGERPRINT, token_ids=kept_ids)
    kept_files = chunk_files(data)
    assert len(kept_files) == 3

    chunks = seeded_window(64, seed=32)
    feeder = _Feeder(chunks, name="doomed", ids=seeded_token_ids(64), fingerprint=FINGERPRINT_1MIB)
    with grpc.insecure_channel(first.target, options=CHANNEL_OPTIONS) as channel:
        future = pb.WindowServiceStub(channel).Freeze.future(iter(feeder))
        try:
            assert wait_for(lambda: len(chunk_files(data)) >= len(kept_files) + 4)
            first.kill(signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as failed:
                future.result(timeout=30)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            feeder.release()
    assert len(chunk_files(data)) > len(kept_files)  # the crash left files behind...
    # ...and possibly a half-written one; make sure there is one for recovery to handle.
    planted = chunk_files(data)[-1].with_name("f" * 64 + ".123.abc.tmp")
    planted.write_bytes(b"half a chunk")

    second = start(processes, data)
    with WindowClient(second.target) as client:
        assert names(client) == ["committed"]
        assert thaw_all(client, "committed") == [c.raw for c in kept]
        missing = client.find_missing([c.digest for c in chunks])
        assert len(missing) == len(chunks)
    assert chunk_files(data) == kept_files
    assert not list(data.glob("chunks/**/*.tmp"))


# -- corruption ---------------------------------------------------------------------------


def _compressible_chunks(tokens: int) -> list[InMemoryChunk]:
    """bf16-like words whose high bytes repeat, so byte-plane + zstd pays off."""
    per_token = bytes_per_token(FINGERPRINT)
    rng = np.random.default_rng(41)
    pieces = []
    for start in range(0, tokens, 256):
        count = min(256, tokens - start)
        words = (0x3F00 + rng.integers(0, 64, size=per_token * count // 2)).astype("<u2")
        pieces.append(words.tobytes())
    return chunks_from_bytes(pieces, 256, tokens)


@pytest.mark.parametrize("stored", ["raw", "compressed"])
def test_flipped_byte_is_detected_never_served(
    tmp_path: Path, processes: list[ManagerProcess], stored: str
) -> None:
    data = tmp_path / "data"
    tokens = 256 * 5
    chunks = synthetic_chunks(tokens, seed=51) if stored == "raw" else _compressible_chunks(tokens)
    first = start(processes, data)
    with WindowClient(first.target) as client:
        client.freeze("w", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(tokens))
    first.stop()

    bad = 2
    path = chunk_file(data, chunks[bad].digest)
    blob = bytearray(path.read_bytes())
    assert blob[5] == (RAW if stored == "raw" else BYTEPLANE_ZSTD), "stored with another codec"
    flip_at = HEADER_SIZE + (len(blob) - HEADER_SIZE) // 2
    blob[flip_at] ^= 0x01
    path.write_bytes(bytes(blob))

    second = start(processes, data)
    with WindowClient(second.target) as client:
        got: list[bytes] = []
        with pytest.raises(DataLoss) as lost, client.thaw("w") as stream:
            for chunk in stream:
                got.append(chunk.data)
        assert got == [c.raw for c in chunks[: len(got)]]
        assert len(got) <= bad
        assert f"chunk {bad}" in lost.value.message
        # The damage stays local: the chunks around it still thaw.
        with client.thaw("w", first_chunk=0, chunk_count=bad) as stream:
            assert [c.data for c in stream] == [c.raw for c in chunks[:bad]]
        with client.thaw("w", first_chunk=bad + 1) as stream:
            assert [c.data for c in stream] == [c.raw for c in chunks[bad + 1 :]]
        # Asking again gives the same refusal (nothing wrong was cached).
        with pytest.raises(DataLoss), client.thaw("w", first_chunk=bad) as stream:
            list(stream)


# -- clones -------------------------------------------------------------------------------


def test_clone_of_256_mib_window_is_constant_time_and_copy_on_write(
    tmp_path: Path, processes: list[ManagerProcess]
) -> None:
    data = tmp_path / "data"
    chunk_count = (256 << 20) // (1 << 20)
    chunks = seeded_window(chunk_count, seed=61)
    digests = [c.digest for c in chunks]
    proc = start(processes, data)
    with WindowClient(proc.target) as client:
        client.freeze(
            "src", chunks, fingerprint=FINGERPRINT_1MIB, token_ids=seeded_token_ids(chunk_count)
        )
        files = chunk_files(data)
        assert len(files) == chunk_count

        timings = []
        for i in range(3):
            started = time.perf_counter()
            clone = client.clone("src", f"branch-{i}", description=f"branch {i}")
            timings.append(time.perf_counter() - started)
            assert clone.parent == "src" and clone.raw_bytes == 256 << 20
        best = min(timings)
        print(f"\nclone of a 256 MiB window: {[f'{t * 1000:.1f} ms' for t in timings]}")
        assert best < 0.050, f"clone took {best * 1000:.1f} ms (best of 3)"
        assert chunk_files(data) == files

        assert client.delete("src").chunks_freed == 0
        for i in (1, 2):
            assert client.delete(f"branch-{i}").chunks_freed == 0
        assert chunk_files(data) == files
        with client.thaw("branch-0") as stream:
            assert [c.digest for c in stream] == digests
        freed = client.delete("branch-0")
        assert freed.chunks_freed == chunk_count
        assert names(client) == []
    assert chunk_files(data) == []


def test_a_second_manager_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    first = ManagerProcess(tmp_path / "data").start()
    try:
        second = ManagerProcess(tmp_path / "data")
        with pytest.raises(RuntimeError, match="another manager is using"):
            second.start()
    finally:
        first.stop()
    ManagerProcess(tmp_path / "data").start().stop()  # free again once the first stopped
