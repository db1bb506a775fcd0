"""The freeze plan both window clients follow: only the chunks the manager lacks are sent; over
several streams every chunk goes on exactly one staging stream, all under one upload id, and a
header-only stream commits them; the result adds up what the streams moved."""

from __future__ import annotations

from cwm_client import InMemoryChunk, pb
from cwm_client.codecs import RAW
from cwm_client.windows.freeze_stream import FreezePlan, build_header
from tests.helpers import FINGERPRINT, synthetic_chunks, token_ids

TOKENS = 256 * 5 + 10  # six chunks


def _header_and_chunks() -> tuple[pb.FreezeHeader, list[InMemoryChunk]]:
    chunks = synthetic_chunks(TOKENS)
    header = build_header("plan", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(TOKENS))
    return header, chunks


def test_only_the_missing_chunks_are_sent() -> None:
    header, chunks = _header_and_chunks()
    missing = {chunks[1].digest, chunks[4].digest}
    plan = FreezePlan.choose(header, chunks, missing, None)
    assert [c.index for c in plan.to_send] == [1, 4]
    assert plan.streams == 1 and plan.upload_id == ""
    sent = [r.chunk.index for r in plan.requests(1 << 20, None, RAW) if r.HasField("chunk")]
    assert sent == [1, 4]


def test_without_a_missing_list_every_chunk_is_sent() -> None:
    header, chunks = _header_and_chunks()
    plan = FreezePlan.choose(header, chunks, None, 1)
    assert [c.index for c in plan.to_send] == list(range(len(chunks)))


def test_parallel_staging_streams_carry_each_chunk_once_under_one_upload() -> None:
    header, chunks = _header_and_chunks()
    plan = FreezePlan.choose(header, chunks, None, 4)
    assert plan.streams == 4 and plan.upload_id.startswith("up-")
    seen: list[int] = []
    for stream in plan.staging_requests(1 << 20, None, RAW):
        first = next(stream)
        assert first.header.upload_id == plan.upload_id and first.header.stage_only
        assert list(first.header.chunk_digests) == list(header.chunk_digests)
        seen += [r.chunk.index for r in stream if r.chunk.data_offset == 0]
    assert sorted(seen) == list(range(len(chunks)))

    commit = list(plan.commit_requests())
    assert len(commit) == 1 and not commit[0].HasField("chunk")
    assert commit[0].header.upload_id == plan.upload_id and not commit[0].header.stage_only


def test_parallel_progress_adds_up_every_stream() -> None:
    header, chunks = _header_and_chunks()
    plan = FreezePlan.choose(header, chunks, None, 3)
    reports: list[tuple[int, int]] = []
    for stream in plan.staging_requests(1 << 20, lambda d, t: reports.append((d, t)), RAW):
        for _ in stream:
            pass
    total = sum(c.raw_size for c in chunks)
    assert reports[-1] == (total, total)
    assert all(t == total for _, t in reports)


def test_the_parallel_result_sums_the_staging_streams() -> None:
    header, chunks = _header_and_chunks()
    plan = FreezePlan.choose(header, chunks, None, 2)
    staged = [
        pb.FreezeResponse(chunks_received=3, bytes_received=100),
        pb.FreezeResponse(chunks_received=2, bytes_received=50),
    ]
    committed = pb.FreezeResponse(window=pb.WindowInfo(name="plan"), chunks_reused=1)
    result = plan.parallel_result(staged, committed)
    assert (result.chunks_sent, result.bytes_sent, result.chunks_reused) == (5, 150, 1)
    assert result.streams == 2 and result.window.name == "plan"
