"""The SDK against a real manager: freeze, thaw, list, get, clone, delete, sync and async.

`make test` also runs this file on protobuf 6 (the generator's venv) to prove the committed
generated code works on both protobuf majors.
"""

from __future__ import annotations

import pytest

from cwm_client import AsyncWindowClient, WindowClient, pb
from cwm_client.errors import AlreadyExists, NotFound
from tests.helpers import FINGERPRINT, ThreadedManager, synthetic_chunks, token_ids


def test_freeze_then_thaw_returns_identical_bytes(client: WindowClient) -> None:
    tokens = 256 * 5 + 77
    chunks = synthetic_chunks(tokens)
    ids = token_ids(tokens)
    result = client.freeze(
        "w1",
        chunks,
        fingerprint=FINGERPRINT,
        token_ids=ids,
        session_id="s1",
        cache_salt="salt",
        tags={"team": "a"},
        description="first window",
    )
    assert result.chunks_sent == 6 and result.chunks_reused == 0
    assert result.window.token_count == tokens
    assert result.window.raw_bytes == sum(c.raw_size for c in chunks)

    with client.thaw("w1") as stream:
        assert list(stream.window.token_ids) == ids
        assert stream.window.cache_salt == "salt"
        thawed = list(stream)
    assert [c.data for c in thawed] == [c.raw for c in chunks]
    assert [c.digest for c in thawed] == [c.digest for c in chunks]
    assert thawed[-1].token_count == 77


def test_thaw_of_a_chunk_range(client: WindowClient) -> None:
    chunks = synthetic_chunks(256 * 6)
    client.freeze("w", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(256 * 6))
    with client.thaw("w", first_chunk=2, chunk_count=3) as stream:
        got = list(stream)
    assert [c.index for c in got] == [2, 3, 4]
    assert [c.data for c in got] == [c.raw for c in chunks[2:5]]


def test_refreeze_of_grown_session_sends_only_new_chunks(client: WindowClient) -> None:
    base = synthetic_chunks(256 * 8)
    ids = token_ids(256 * 9)
    client.freeze("v1", base, fingerprint=FINGERPRINT, token_ids=ids[: 256 * 8])
    grown = base + synthetic_chunks(256, seed=9)
    grown = [type(c)(i, i * 256, 256, c.raw) for i, c in enumerate(grown)]
    result = client.freeze("v2", grown, fingerprint=FINGERPRINT, token_ids=ids, parent="v1")
    assert (result.chunks_sent, result.chunks_reused) == (1, 8)
    assert result.bytes_sent == grown[-1].raw_size
    assert client.get("v2").parent == "v1"


def test_list_pages_filters_and_get(client: WindowClient) -> None:
    chunks = synthetic_chunks(256)
    ids = token_ids(256)
    for i in range(7):
        client.freeze(
            f"win-{i:02d}",
            chunks,
            fingerprint=FINGERPRINT,
            token_ids=ids,
            session_id="even" if i % 2 == 0 else "odd",
            tags={"parity": "even" if i % 2 == 0 else "odd"},
        )
    page, token = client.list_page(page_size=3)
    assert [w.name for w in page] == ["win-00", "win-01", "win-02"] and token
    assert not page[0].token_ids  # BASIC view leaves token ids out
    assert [w.name for w in client.list(page_size=2)] == [f"win-{i:02d}" for i in range(7)]
    assert [w.name for w in client.list(tags={"parity": "odd"}, page_size=1)] == [
        "win-01",
        "win-03",
        "win-05",
    ]
    assert len(list(client.list(session_id="even"))) == 4
    assert [w.name for w in client.list(search="N-06")] == ["win-06"]
    full = client.get("win-03")
    assert len(full.token_ids) == 256 and len(full.chunks) == 1
    with pytest.raises(NotFound):
        client.get("win-99")


def test_clone_shares_chunks_and_survives_source_delete(
    client: WindowClient, manager: ThreadedManager
) -> None:
    chunks = synthetic_chunks(256 * 4)
    client.freeze("src", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(256 * 4))
    files_before = manager.manager.disk.file_count()
    clone = client.clone("src", "branch", description="a branch")
    assert clone.parent == "src" and clone.description == "a branch"
    assert manager.manager.disk.file_count() == files_before
    with pytest.raises(AlreadyExists):
        client.clone("src", "branch")
    assert client.delete("src").chunks_freed == 0
    with client.thaw("branch") as stream:
        assert [c.data for c in stream] == [c.raw for c in chunks]
    freed = client.delete("branch")
    assert freed.chunks_freed == 4
    assert manager.manager.disk.file_count() == 0


async def test_async_client_round_trip(manager: ThreadedManager) -> None:
    chunks = synthetic_chunks(256 * 3 + 5, seed=3)
    async with AsyncWindowClient(manager.target) as client:
        await client.freeze(
            "async-w", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(256 * 3 + 5)
        )
        assert await client.find_missing([c.digest for c in chunks]) == []
        names = [w.name async for w in client.list()]
        assert names == ["async-w"]
        stream = await client.thaw("async-w")
        async with stream:
            got = [c.data async for c in stream]
        assert got == [c.raw for c in chunks]
        clone = await client.clone("async-w", "async-b")
        assert clone.parent == "async-w"
        assert (await client.get("async-b", view=pb.WindowView.WINDOW_VIEW_BASIC)).chunk_count == 4
        await client.delete("async-w")
        await client.delete("async-b")
        with pytest.raises(NotFound):
            await client.delete("async-b")
