"""KeyedChunkService against a real manager: values under opaque keys (LMCache's remote tier),
stored as verified, deduplicated cwm chunks, and promotable to windows."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cwm_client import AsyncKeyedChunkClient, KeyedChunkClient, KeyedValue, WindowClient, pb
from cwm_client.chunks import digest
from cwm_client.errors import (
    AlreadyExists,
    DataLoss,
    InvalidArgument,
    NotFound,
)
from cwm_client.keyed import put_requests
from cwm_server.fsck import run_fsck
from cwm_server.manager.config import ManagerConfig
from cwm_server.manager.keyed.chunks import KeyedChunks
from cwm_server.manager.keyed.put import IncomingValue
from tests.helpers import FINGERPRINT, ThreadedManager, synthetic_chunks, token_ids

KEY = "vllm@model@1@0@{:016x}@bfloat16"


@pytest.fixture
def keyed(manager: ThreadedManager) -> Iterator[KeyedChunkClient]:
    with KeyedChunkClient(manager.target) as client:
        yield client


def chunk_files(manager: ThreadedManager) -> set[tuple[str, bytes]]:
    return {(tenant, d) for tenant, d, _ in manager.manager.disk.iter_chunks()}


def value(i: int, size: int = 4096, metadata: bytes = b"") -> KeyedValue:
    return KeyedValue(KEY.format(i), os.urandom(size), metadata=metadata, word_size=2)


def test_put_then_get_is_byte_exact(keyed: KeyedChunkClient) -> None:
    big = KeyedValue("big/key", os.urandom(3 * (1 << 20) + 17), metadata=b"\x01shape", word_size=2)
    small = value(1, metadata=b"meta")
    response = keyed.put([big, small], part_bytes=1 << 20)
    assert response.keys_stored == 2
    assert response.bytes_received == len(big.data) + len(small.data)

    got = keyed.get(["big/key", "absent", small.key], part_bytes=256 << 10)
    assert got[1] is None
    assert got[0] is not None and got[0].data == big.data and got[0].metadata == b"\x01shape"
    assert got[0].digest == digest(big.data)
    assert got[2] is not None and got[2].data == small.data and got[2].metadata == b"meta"


def test_contains_prefix_counts_leading_present_keys(keyed: KeyedChunkClient) -> None:
    values = [value(i) for i in range(5)]
    keyed.put(values[:3] + values[4:])
    keys = [v.key for v in values]
    assert keyed.contains_prefix(keys) == 3
    assert keyed.contains_prefix(keys[:2]) == 2
    assert keyed.contains_prefix(keys[3:]) == 0
    assert keyed.contains_prefix([]) == 0


def test_list_keys_pages_in_order_and_filters_by_prefix(keyed: KeyedChunkClient) -> None:
    values = [KeyedValue(f"a/{i:02d}", os.urandom(100 + i)) for i in range(7)]
    values.append(KeyedValue("b/00", b"x" * 10))
    keyed.put(values)

    page, token = keyed.list_page(page_size=3, key_prefix="a/")
    assert [i.key for i in page] == ["a/00", "a/01", "a/02"] and token
    seen = [i.key for i in page]
    while token:
        page, token = keyed.list_page(page_size=3, page_token=token, key_prefix="a/")
        seen += [i.key for i in page]
    assert seen == [f"a/{i:02d}" for i in range(7)]
    everything = list(keyed.list_keys(page_size=2))
    assert [i.key for i in everything] == [*seen, "b/00"]
    assert everything[3].raw_size == 103 and everything[3].digest == digest(values[3].data)
    assert everything[3].stored_size > 0 and everything[3].created_at.seconds > 0
    with pytest.raises(InvalidArgument) as bad:
        keyed.list_page(page_token="not a token!")
    assert bad.value.field == "page_token"


def test_delete_collects_chunks_nothing_else_uses(
    keyed: KeyedChunkClient, manager: ThreadedManager
) -> None:
    shared = os.urandom(8192)
    keyed.put([KeyedValue("one", shared), KeyedValue("two", shared), value(3)])
    assert len(chunk_files(manager)) == 2  # "one" and "two" share a chunk (dedup)

    response = keyed.delete(["one", "nope"])
    assert (response.keys_deleted, response.chunks_freed) == (1, 0)
    assert keyed.get(["two"])[0] is not None

    response = keyed.delete(["two", KEY.format(3)])
    assert (response.keys_deleted, response.chunks_freed) == (2, 2)
    assert response.bytes_freed > 0
    assert chunk_files(manager) == set()
    assert keyed.get(["one", "two"]) == [None, None]


def test_overwrite_replaces_the_value_and_frees_the_old_chunk(
    keyed: KeyedChunkClient, manager: ThreadedManager
) -> None:
    keyed.put([KeyedValue("k", b"old" * 1000)])
    keyed.put([KeyedValue("k", b"new" * 1000, metadata=b"v2")])
    got = keyed.get(["k"])[0]
    assert got is not None and got.data == b"new" * 1000 and got.metadata == b"v2"
    assert chunk_files(manager) == {("default", digest(b"new" * 1000))}


def test_bad_input_gets_exact_codes_and_stores_nothing(
    keyed: KeyedChunkClient, manager: ThreadedManager
) -> None:
    good = value(1)
    with pytest.raises(InvalidArgument) as oversized:
        keyed.put([good, KeyedValue("k" * 1025, b"data")])
    assert oversized.value.field == "part.key" and oversized.value.reason == "BAD_KEY"

    corrupt = KeyedValue("corrupt", b"payload" * 100, digest=digest(b"something else"))
    with pytest.raises(DataLoss) as mismatch:
        keyed.put([good, corrupt])
    assert mismatch.value.reason == "DIGEST_MISMATCH"

    # Neither stream stored anything: not the good value sent before the bad one either.
    assert list(keyed.list_keys()) == []
    assert chunk_files(manager) == set()

    with pytest.raises(InvalidArgument) as empty:
        keyed.put([KeyedValue("empty", b"")])
    assert empty.value.field == "part.raw_size"
    with pytest.raises(InvalidArgument) as short_digest:
        keyed.put([KeyedValue("k", b"abc", digest=b"\x00" * 16)])
    assert short_digest.value.field == "part.digest"
    with pytest.raises(InvalidArgument) as long_get:
        keyed.contains_prefix(["ok", "k" * 1025])
    assert long_get.value.field == "keys[1]"


def test_too_many_keys_in_one_get_call_is_invalid(manager: ThreadedManager) -> None:
    with grpc.insecure_channel(manager.target) as channel:
        stub = pb.KeyedChunkServiceStub(channel)
        request = pb.GetKeyedChunksRequest(keys=[f"k{i}" for i in range(1025)])
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.GetKeyedChunks(request))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_interleaved_or_truncated_values_are_invalid(manager: ThreadedManager) -> None:
    a = list(put_requests([KeyedValue("a", os.urandom(3000))], part_bytes=1000))
    b = list(put_requests([KeyedValue("b", os.urandom(3000))], part_bytes=1000))
    with grpc.insecure_channel(manager.target) as channel:
        stub = pb.KeyedChunkServiceStub(channel)
        for stream in ([a[0], b[0], a[1], a[2]], a[:2]):
            with pytest.raises(grpc.RpcError) as raised:
                stub.PutKeyedChunks(iter(stream))
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert chunk_files(manager) == set()


def test_keys_are_scoped_by_tenant(keyed: KeyedChunkClient, manager: ThreadedManager) -> None:
    values = [value(i) for i in range(3)]
    keyed.put(values)
    domain = KeyedChunks(manager.manager)
    keys = [v.key for v in values]
    assert manager._run(domain.contains_prefix("default", keys)) == 3
    assert manager._run(domain.contains_prefix("other", keys)) == 0
    infos, _ = manager._run(domain.list("other", pb.ListKeysRequest()))
    assert infos == []

    async def read(tenant: str) -> list[pb.GetKeyedChunksResponse]:
        return [r async for r in domain.get(tenant, pb.GetKeyedChunksRequest(keys=keys))]

    assert [r.found for r in manager._run(read("other"))] == [False] * 3
    deleted = manager._run(domain.delete("other", keys))
    assert deleted.keys_deleted == 0
    assert keyed.contains_prefix(keys) == 3


def test_promote_keys_to_a_window_then_thaw_byte_exact(
    keyed: KeyedChunkClient, client: WindowClient, manager: ThreadedManager
) -> None:
    tokens = 600  # chunks of 256, 256 and 88 tokens in the canonical layout
    chunks = synthetic_chunks(tokens, FINGERPRINT, chunk_tokens=256, seed=3)
    ids = token_ids(tokens, seed=3)
    keys = [KEY.format(1000 + c.index) for c in chunks]
    keyed.put([KeyedValue(k, c.raw, word_size=2) for k, c in zip(keys, chunks, strict=True)])

    window = keyed.promote(
        "from-lmcache",
        keys,
        fingerprint=FINGERPRINT,
        token_ids=ids,
        chunk_tokens=256,
        session_id="s1",
        tags={"source": "lmcache"},
    )
    assert window.name == "from-lmcache" and window.chunk_count == 3
    assert window.token_count == tokens and window.tags["source"] == "lmcache"
    assert client.get("from-lmcache").token_ids == ids

    # The window holds its own references: deleting the keys keeps its chunks.
    assert keyed.delete(keys).chunks_freed == 0
    with client.thaw("from-lmcache") as stream:
        thawed = list(stream)
    assert [c.data for c in thawed] == [c.raw for c in chunks]
    assert [c.token_count for c in thawed] == [256, 256, 88]
    assert client.delete("from-lmcache").chunks_freed == 3
    assert chunk_files(manager) == set()


def test_promote_checks_keys_sizes_and_names(keyed: KeyedChunkClient) -> None:
    chunks = synthetic_chunks(300, FINGERPRINT, chunk_tokens=256, seed=4)
    keys = ["c0", "c1"]
    keyed.put([KeyedValue(k, c.raw) for k, c in zip(keys, chunks, strict=True)])
    args = {"fingerprint": FINGERPRINT, "token_ids": token_ids(300, seed=4), "chunk_tokens": 256}

    with pytest.raises(NotFound) as missing:
        keyed.promote("w", ["c0", "gone"], **args)
    assert missing.value.field == "keys[1]" and missing.value.reason == "KEY_NOT_FOUND"
    with pytest.raises(InvalidArgument) as wrong_size:
        keyed.promote("w", ["c1", "c0"], **args)  # 44-token value where 256 tokens belong
    assert wrong_size.value.field == "keys[0]"
    with pytest.raises(InvalidArgument) as wrong_count:
        keyed.promote("w", ["c0"], **args)
    assert wrong_count.value.field == "keys"
    with pytest.raises(InvalidArgument) as bad_name:
        keyed.promote("bad name!", keys, **args)
    assert bad_name.value.field == "name"
    keyed.promote("w", keys, **args)
    with pytest.raises(AlreadyExists):
        keyed.promote("w", keys, **args)


def test_keys_survive_restart_and_fsck_repair(tmp_path: Path) -> None:
    """Key rows hold chunk references: neither start-up recovery nor `fsck --repair` takes
    their chunks for orphans."""
    config = ManagerConfig(data_dir=tmp_path / "data", listen="127.0.0.1:0")
    values = [value(i) for i in range(3)]
    running = ThreadedManager(config)
    with KeyedChunkClient(running.target) as keyed:
        keyed.put(values)
    running.stop()

    report = run_fsck(config.data_dir, repair=True)
    assert report.clean, [p.message for p in report.problems]

    running = ThreadedManager(config)
    try:
        with KeyedChunkClient(running.target) as keyed:
            got = keyed.get([v.key for v in values])
        assert [g.data if g else None for g in got] == [v.data for v in values]
    finally:
        running.stop()


async def test_async_client_round_trip(manager: ThreadedManager) -> None:
    values = [value(i, size=300_000) for i in range(3)]
    async with AsyncKeyedChunkClient(manager.target) as keyed:
        stored = await keyed.put(values, part_bytes=100_000)
        assert stored.keys_stored == 3
        got = await keyed.get([v.key for v in values] + ["absent"], part_bytes=64 << 10)
        assert [g.data if g else None for g in got] == [v.data for v in values] + [None]
        assert await keyed.contains_prefix([v.key for v in values]) == 3
        assert [i.key async for i in keyed.list_keys(page_size=2)] == sorted(v.key for v in values)
        assert (await keyed.delete([values[0].key])).keys_deleted == 1
        assert await keyed.contains_prefix([v.key for v in values]) == 0


def _first_part(**changes: object) -> pb.KeyedChunkPart:
    fields: dict[str, object] = {"key": "k", "digest": digest(b"abcdef"), "raw_size": 6}
    fields.update(changes)
    return pb.KeyedChunkPart(**fields)  # type: ignore[arg-type]


def test_a_value_fills_part_by_part_to_its_raw_size() -> None:
    incoming = IncomingValue.start(_first_part(data=b"abc", word_size=2), max_chunk_bytes=1024)
    assert incoming.word_size == 2 and incoming.subject == "the value of key 'k'"
    assert not incoming.add(b"abc")
    incoming.check_next(pb.KeyedChunkPart(key="k", data_offset=3, data=b"def"))
    assert incoming.add(b"def")
    assert bytes(incoming.buffer) == b"abcdef"
    assert IncomingValue.start(_first_part(), max_chunk_bytes=6).word_size == 1  # 0: bytes


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"key": ""}, "part.key"),
        ({"data_offset": 1}, "part.data_offset"),
        ({"digest": b"short"}, "part.digest"),
        ({"raw_size": 0}, "part.raw_size"),
        ({"raw_size": 7}, "part.raw_size"),  # above max_chunk_bytes
        ({"metadata": bytes(65537)}, "part.metadata"),
        ({"word_size": 3}, "part.word_size"),
    ],
)
def test_a_first_part_that_cannot_start_a_value_is_refused(
    changes: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        IncomingValue.start(_first_part(**changes), max_chunk_bytes=6)
    assert refused.value.field == field


@pytest.mark.parametrize(
    ("part", "field"),
    [
        (pb.KeyedChunkPart(key="other", data_offset=3), "part.key"),  # values interleave
        (pb.KeyedChunkPart(key="k", data_offset=2), "part.data_offset"),
        (pb.KeyedChunkPart(key="k", data_offset=3, raw_size=7), "part.digest"),
        (pb.KeyedChunkPart(key="k", data_offset=3, digest=bytes(32)), "part.digest"),
    ],
)
def test_a_later_part_must_continue_its_value(part: pb.KeyedChunkPart, field: str) -> None:
    incoming = IncomingValue.start(_first_part(), max_chunk_bytes=6)
    incoming.add(b"abc")
    with pytest.raises(InvalidArgument) as refused:
        incoming.check_next(part)
    assert refused.value.field == field


def test_parts_past_the_raw_size_are_refused() -> None:
    incoming = IncomingValue.start(_first_part(), max_chunk_bytes=6)
    with pytest.raises(InvalidArgument) as refused:
        incoming.add(b"abcdefg")
    assert refused.value.field == "part.data" and incoming.filled == 0
