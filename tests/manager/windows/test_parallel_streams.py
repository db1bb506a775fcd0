"""One window over several streams, and codecs on the wire, against a real manager.

- a thaw read over N striped streams hands out exactly what one stream does, in order;
- a freeze over N streams stages its chunks under one upload and commits atomically: the
  window is invisible until the commit, a failed or abandoned upload leaves nothing behind;
- chunks sent compressed (freeze) or accepted compressed (thaw) arrive byte-identical.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from cwm_client import AsyncWindowClient, InMemoryChunk, WindowClient, chunks_from_bytes, codecs, pb
from cwm_client._common import (
    CHANNEL_OPTIONS,
    ThawDecoder,
    auto_streams,
    build_header,
    freeze_requests,
    stage_header,
)
from cwm_client.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    from_rpc_error,
)
from cwm_server.manager.config import ManagerConfig
from tests.helpers import FINGERPRINT, ThreadedManager, chunk_files, synthetic_chunks, token_ids

CHUNK_BYTES = 256 * 2048  # FINGERPRINT: 2 KiB of KV per token


def kv_like_chunks(count: int, seed: int = 0, tail_tokens: int = 0) -> list[InMemoryChunk]:
    """bf16 words of normal values (compressible like KV); the last chunk may be short."""
    rng = np.random.default_rng(seed)
    tokens = 256 * count - (256 - tail_tokens if tail_tokens else 0)
    pieces = []
    for start in range(0, tokens, 256):
        words = min(256, tokens - start) * 1024
        floats = rng.standard_normal(words).astype(np.float32)
        pieces.append((floats.view(np.uint32) >> 16).astype("<u2").tobytes())
    return chunks_from_bytes(pieces, 256, tokens)


def freeze(client: WindowClient, name: str, chunks: list[InMemoryChunk], **kw: object):  # type: ignore[no-untyped-def]
    tokens = sum(c.token_count for c in chunks)
    return client.freeze(name, chunks, fingerprint=FINGERPRINT, token_ids=token_ids(tokens), **kw)


@pytest.fixture
def short_ttl_manager(tmp_path: Path) -> Iterator[ThreadedManager]:
    config = ManagerConfig(data_dir=tmp_path / "data", listen="127.0.0.1:0", upload_ttl_s=0.5)
    running = ThreadedManager(config)
    yield running
    running.stop()


# -- parallel thaw ---------------------------------------------------------------------------


@pytest.mark.parametrize("streams", [2, 3, 4, 7])
def test_parallel_thaw_equals_single_stream(client: WindowClient, streams: int) -> None:
    chunks = kv_like_chunks(9, tail_tokens=100)
    freeze(client, "w", chunks)
    with client.thaw("w", streams=1) as one:
        single = list(one)
        window = one.window
    with client.thaw("w", streams=streams) as many:
        assert many.streams == streams
        assert many.window == window  # the FULL window, token ids and chunk list included
        parallel = list(many)
    assert [(c.index, c.token_start, c.token_count, c.digest, c.data) for c in parallel] == [
        (c.index, c.token_start, c.token_count, c.digest, c.data) for c in single
    ]
    assert [c.data for c in parallel] == [c.raw for c in chunks]


@pytest.mark.parametrize(("first", "count"), [(0, 0), (2, 0), (1, 5), (6, 3), (8, 1)])
def test_parallel_thaw_of_a_range(client: WindowClient, first: int, count: int) -> None:
    chunks = kv_like_chunks(9)
    freeze(client, "w", chunks)
    end = len(chunks) if count == 0 else first + count
    with client.thaw("w", first_chunk=first, chunk_count=count, streams=4) as stream:
        got = list(stream)
    assert [c.index for c in got] == list(range(first, end))
    assert [c.data for c in got] == [c.raw for c in chunks[first:end]]


def test_streams_are_chosen_by_size_and_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    mib = 1 << 20
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert auto_streams(10 * mib, 40, None) == 1
    assert auto_streams(1 << 30, 1, None) == 1
    assert auto_streams(100 * mib, 100, None) == 2
    assert auto_streams(1 << 30, 1024, None) == 4
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert auto_streams(1 << 30, 1024, None) == 2
    monkeypatch.setattr("os.cpu_count", lambda: 2)  # measured: one stream is faster here
    assert auto_streams(1 << 30, 1024, None) == 1
    assert auto_streams(1 << 30, 1024, 3) == 3
    assert auto_streams(10, 2, 8) == 2  # never more streams than chunks
    with pytest.raises(InvalidArgument):
        auto_streams(10, 2, 0)


def test_auto_thaw_uses_one_stream_for_a_small_window(client: WindowClient) -> None:
    chunks = kv_like_chunks(3)
    freeze(client, "small", chunks)
    with client.thaw("small", streams=None) as stream:
        assert stream.streams == 1
        assert [c.data for c in stream] == [c.raw for c in chunks]


def test_abandoned_parallel_thaw_releases_its_streams(
    client: WindowClient, manager: ThreadedManager
) -> None:
    freeze(client, "w", kv_like_chunks(12))
    stream = client.thaw("w", streams=4)
    chunks = iter(stream)
    next(chunks)
    next(chunks)
    stream.close()
    deadline = time.monotonic() + 10
    while manager.manager.pins.held() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not manager.manager.pins.held()  # every stream's pins are gone: the calls ended


def test_closing_a_parallel_thaw_from_another_thread_ends_the_iteration(
    client: WindowClient,
) -> None:
    chunks = kv_like_chunks(40)
    freeze(client, "w", chunks)
    stream = client.thaw("w", streams=4, read_ahead=2)
    got = iter(stream)
    next(got)
    closer = threading.Thread(target=stream.close)
    closer.start()
    closer.join(timeout=10)
    started = time.monotonic()
    with pytest.raises(Cancelled):
        for _ in got:  # what was queued before the close, then Cancelled: never a hang
            assert time.monotonic() - started < 10
    assert time.monotonic() - started < 10


def test_parallel_thaw_of_a_missing_window_is_not_found(client: WindowClient) -> None:
    with pytest.raises(NotFound):
        client.thaw("nope", streams=3)


def test_a_stream_of_another_window_is_refused(
    client: WindowClient, manager: ThreadedManager
) -> None:
    """The extra streams check that they read the window the first stream described."""
    freeze(client, "a", kv_like_chunks(3, seed=1))
    freeze(client, "b", kv_like_chunks(3, seed=2))
    with client.thaw("a") as first:
        reference = first.window
        list(first)
    with grpc.insecure_channel(manager.target, options=CHANNEL_OPTIONS) as channel:
        messages = pb.WindowServiceStub(channel).Thaw(
            pb.ThawRequest(name="b", window_view=pb.WindowView.WINDOW_VIEW_BASIC), timeout=30
        )
        decoder = ThawDecoder(reference=reference)
        with pytest.raises(Aborted, match="replaced while it was being thawed"):
            for message in messages:
                decoder.accept(message)


def test_thaw_request_stride_and_basic_view(client: WindowClient, manager: ThreadedManager) -> None:
    freeze(client, "w", kv_like_chunks(10))
    with grpc.insecure_channel(manager.target, options=CHANNEL_OPTIONS) as channel:
        stub = pb.WindowServiceStub(channel)
        messages = list(
            stub.Thaw(
                pb.ThawRequest(
                    name="w",
                    first_chunk=1,
                    chunk_count=8,
                    chunk_stride=3,
                    window_view=pb.WindowView.WINDOW_VIEW_BASIC,
                ),
                timeout=30,
            )
        )
    window = messages[0].window
    assert window.chunk_count == 10 and not window.chunks and not window.token_ids
    assert [m.chunk.index for m in messages[1:]] == [1, 4, 7]


# -- parallel freeze -------------------------------------------------------------------------


@pytest.mark.parametrize("streams", [2, 3])
def test_parallel_freeze_commits_the_same_window(client: WindowClient, streams: int) -> None:
    chunks = kv_like_chunks(7, tail_tokens=31)
    result = freeze(client, "par", chunks, streams=streams)
    assert result.streams == streams
    assert (result.chunks_sent, result.chunks_reused) == (7, 0)
    assert result.bytes_sent == sum(c.raw_size for c in chunks)
    single = freeze(client, "one", chunks, streams=1, skip_existing=False)
    assert result.window.raw_bytes == single.window.raw_bytes
    assert list(client.get("par").chunks) == list(client.get("one").chunks)
    with client.thaw("par", streams=streams) as stream:
        assert [c.data for c in stream] == [c.raw for c in chunks]


def test_parallel_refreeze_sends_only_new_chunks(client: WindowClient) -> None:
    base = kv_like_chunks(6)
    freeze(client, "v1", base)
    grown = kv_like_chunks(9)  # same seed: the first six chunks are the same bytes
    result = freeze(client, "v2", grown, streams=3, parent="v1")
    assert result.streams == 3
    assert (result.chunks_sent, result.chunks_reused) == (3, 6)


def _send(manager: ThreadedManager, requests: Iterable[pb.FreezeRequest]) -> pb.FreezeResponse:
    with grpc.insecure_channel(manager.target, options=CHANNEL_OPTIONS) as channel:
        try:
            response: pb.FreezeResponse = pb.WindowServiceStub(channel).Freeze(
                iter(requests), timeout=30
            )
            return response
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None


def _stage(
    manager: ThreadedManager, header: pb.FreezeHeader, chunks: list[InMemoryChunk]
) -> pb.FreezeResponse:
    return _send(manager, freeze_requests(header, chunks))


def test_staged_chunks_are_invisible_until_the_commit(
    client: WindowClient, manager: ThreadedManager
) -> None:
    chunks = kv_like_chunks(6)
    header = build_header("atomic", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(256 * 6))
    staging = stage_header(header, "upload-0001", stage_only=True)
    first = _stage(manager, staging, chunks[0::2])
    second = _stage(manager, staging, chunks[1::2])
    assert not first.HasField("window") and first.chunks_received == 3
    assert second.chunks_received == 3
    with pytest.raises(NotFound):
        client.get("atomic")
    assert [w.name for w in client.list()] == []
    assert len(client.find_missing([c.digest for c in chunks])) == 6  # staged is not stored
    commit = _stage(manager, stage_header(header, "upload-0001", stage_only=False), [])
    assert commit.chunks_received == 0 and commit.chunks_staged == 6
    assert commit.window.chunk_count == 6
    with client.thaw("atomic") as stream:
        assert [c.data for c in stream] == [c.raw for c in chunks]
    assert len(manager.manager.uploads) == 0


def test_a_failed_staging_stream_leaves_nothing(
    short_ttl_manager: ThreadedManager,
) -> None:
    manager = short_ttl_manager
    chunks = kv_like_chunks(6)
    header = build_header("broken", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(1536))
    staging = stage_header(header, "upload-0002", stage_only=True)
    _stage(manager, staging, chunks[:3])
    bad = list(freeze_requests(staging, chunks[3:]))
    bad[-1].chunk.data = bytes(len(bad[-1].chunk.data))  # the last chunk's bytes are wrong
    with pytest.raises(DataLoss, match="digest"):
        _send(manager, bad)
    # No commit comes: after the upload TTL its staged chunks are collected.
    deadline = time.monotonic() + 10
    while chunk_files(manager.config.data_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert chunk_files(manager.config.data_dir) == []
    assert len(manager.manager.uploads) == 0
    with WindowClient(manager.target) as client:
        with pytest.raises(NotFound):
            client.get("broken")
        # A late commit finds nothing staged and says which chunk is missing.
        with pytest.raises(FailedPrecondition, match="upload 'upload-0002' did not stage it"):
            _stage(manager, stage_header(header, "upload-0002", stage_only=False), [])


def test_sdk_parallel_freeze_failure_commits_nothing(
    short_ttl_manager: ThreadedManager,
) -> None:
    class Exploding(InMemoryChunk):
        def data(self) -> bytes:
            raise RuntimeError("engine lost the KV")

    chunks = kv_like_chunks(6)
    broken = [*chunks[:5], Exploding(5, 5 * 256, 256, chunks[5].raw, chunks[5].digest)]
    with WindowClient(short_ttl_manager.target) as client:
        with pytest.raises(Exception, match=r"engine lost the KV|Exception iterating"):
            freeze(client, "w", broken, streams=3)
        with pytest.raises(NotFound):
            client.get("w")
    deadline = time.monotonic() + 10
    while chunk_files(short_ttl_manager.config.data_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert chunk_files(short_ttl_manager.config.data_dir) == []


def test_a_stage_stream_for_a_taken_name_fails_early(
    client: WindowClient, manager: ThreadedManager
) -> None:
    freeze(client, "taken", kv_like_chunks(2, seed=5))
    chunks = kv_like_chunks(4)
    header = build_header("taken", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(1024))
    with pytest.raises(AlreadyExists):
        _stage(manager, stage_header(header, "upload-0003", stage_only=True), chunks)
    assert len(manager.manager.uploads) == 1  # empty, and closed after the TTL


def test_a_failed_commit_collects_the_staged_chunks(
    client: WindowClient, manager: ThreadedManager
) -> None:
    chunks = kv_like_chunks(4)
    header = build_header("late", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(1024))
    _stage(manager, stage_header(header, "upload-0004", stage_only=True), chunks)
    staged = {c.digest.hex() for c in chunks}
    assert staged <= {p.name for p in chunk_files(manager.config.data_dir)}
    freeze(client, "late", kv_like_chunks(1, seed=9))  # the name is taken meanwhile
    with pytest.raises(AlreadyExists):
        _stage(manager, stage_header(header, "upload-0004", stage_only=False), [])
    deadline = time.monotonic() + 10
    while staged & {p.name for p in chunk_files(manager.config.data_dir)}:
        assert time.monotonic() < deadline, "staged chunks were not collected"
        time.sleep(0.05)
    assert len(manager.manager.uploads) == 0


def test_upload_ids_are_checked(client: WindowClient, manager: ThreadedManager) -> None:
    chunks = kv_like_chunks(2)
    header = build_header("u", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(512))
    with pytest.raises(InvalidArgument, match="stage_only needs an upload_id"):
        _stage(manager, stage_header(header, "", stage_only=True), chunks)
    with pytest.raises(InvalidArgument, match="upload_id"):
        _stage(manager, stage_header(header, "bad id!", stage_only=True), chunks)
    _stage(manager, stage_header(header, "upload-0005", stage_only=True), chunks[:1])
    other = build_header("v", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(512))
    with pytest.raises(InvalidArgument, match="belongs to another window"):
        _stage(manager, stage_header(other, "upload-0005", stage_only=True), chunks[1:])
    commit = _stage(manager, stage_header(header, "upload-0005", stage_only=False), chunks[1:])
    assert (commit.chunks_received, commit.chunks_staged) == (1, 1)
    assert client.get("u").chunk_count == 2


async def test_async_client_parallel_freeze_and_thaw(manager: ThreadedManager) -> None:
    chunks = kv_like_chunks(8, tail_tokens=3)
    tokens = sum(c.token_count for c in chunks)
    async with AsyncWindowClient(manager.target) as client:
        result = await client.freeze(
            "aw",
            chunks,
            fingerprint=FINGERPRINT,
            token_ids=token_ids(tokens),
            streams=3,
            wire_codec=codecs.BYTEPLANE_LZ4,
        )
        assert result.streams == 3 and result.chunks_sent == 8
        assert result.bytes_sent < 0.9 * sum(c.raw_size for c in chunks)
        for streams in (1, 4):
            stream = await client.thaw("aw", streams=streams, accept_codecs=[codecs.BYTEPLANE_ZSTD])
            async with stream:
                got = [c async for c in stream]
            assert stream.streams == streams
            assert [c.data for c in got] == [c.raw for c in chunks]
        stream = await client.thaw("aw", streams=4, first_chunk=2, chunk_count=5)
        assert [c.index async for c in stream] == [2, 3, 4, 5, 6]
        abandoned = await client.thaw("aw", streams=4)
        await abandoned.__aiter__().__anext__()
        abandoned.close()
    await asyncio.sleep(0)


# -- codecs on the wire ----------------------------------------------------------------------


@pytest.mark.parametrize("codec", sorted(codecs.CODECS), ids=codecs.codec_name)
def test_wire_compressed_freeze_and_thaw_are_byte_identical(
    client: WindowClient, codec: int
) -> None:
    chunks = kv_like_chunks(5, tail_tokens=17)
    raw = sum(c.raw_size for c in chunks)
    result = freeze(client, "w", chunks, wire_codec=codec)
    pays = codec in (codecs.BYTEPLANE_ZSTD, codecs.BYTEPLANE_LZ4, codecs.ZSTD)
    assert (result.bytes_sent < 0.9 * raw) == pays
    refs = client.get("w").chunks
    if pays:  # stored as it came: the manager did not compress it again
        assert {r.stored_codec for r in refs} == {codec}
    for accept in ([], [codec], [codecs.LZ4, codecs.BYTEPLANE_ZSTD]):
        with client.thaw("w", accept_codecs=accept) as stream:
            got = list(stream)
            on_wire = stream.encoded_bytes
        assert [c.data for c in got] == [c.raw for c in chunks]
        assert (on_wire < 0.9 * raw) == (accept != [] and (pays or accept != [codec]))


def test_thaw_sends_the_stored_encoding_when_accepted(
    client: WindowClient, manager: ThreadedManager
) -> None:
    chunks = kv_like_chunks(3)
    freeze(client, "w", chunks)  # raw on the wire; the manager stores byte planes + zstd
    stored = {r.stored_size - 16 for r in client.get("w").chunks}
    with grpc.insecure_channel(manager.target, options=CHANNEL_OPTIONS) as channel:
        messages = list(
            pb.WindowServiceStub(channel).Thaw(
                pb.ThawRequest(name="w", accept_codecs=[99, codecs.BYTEPLANE_ZSTD]), timeout=30
            )
        )
    parts = [m.chunk for m in messages[1:]]
    assert {p.codec for p in parts} == {codecs.BYTEPLANE_ZSTD}
    assert {p.encoded_size for p in parts} == stored  # as stored, not encoded again
    decoder = ThawDecoder()
    thawed = [c for m in messages if (c := decoder.accept(m)) is not None]
    assert [c.data for c in thawed] == [c.raw for c in chunks]


def test_incompressible_chunks_go_raw_whatever_is_accepted(client: WindowClient) -> None:
    chunks = synthetic_chunks(256 * 3)
    result = freeze(client, "noise", chunks, wire_codec=codecs.BYTEPLANE_ZSTD)
    assert result.bytes_sent == sum(c.raw_size for c in chunks)
    with client.thaw("noise", accept_codecs=[codecs.LZ4, codecs.BYTEPLANE_ZSTD]) as stream:
        assert [c.data for c in stream] == [c.raw for c in chunks]
        assert stream.encoded_bytes == sum(c.raw_size for c in chunks)
