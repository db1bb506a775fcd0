"""Bad input gets its exact gRPC status, a message a person can act on, and stores nothing.

Everything goes through the raw generated stub, so the SDK's own checks cannot hide a
manager that accepts what it should refuse.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import grpc
import pytest

from cwm_client import InMemoryChunk, pb
from cwm_client._common import MAX_MESSAGE_BYTES, build_header, freeze_requests
from cwm_client.chunks import digest, iter_parts
from cwm_client.codecs import BYTEPLANE_ZSTD, RAW, encode
from cwm_client.errors import from_rpc_error
from tests.helpers import FINGERPRINT, ThreadedManager, chunk_files, synthetic_chunks, token_ids

Code = grpc.StatusCode
TOKENS = 256 + 100  # one full chunk and a short one
CHUNKS = synthetic_chunks(TOKENS, seed=7)
IDS = token_ids(TOKENS, seed=7)

BAD_NAMES = [
    "",
    "a" * 129,
    "a/b",
    "../x",
    ".",
    "..",
    "a b",
    "wïndow",
    "窓",
    "name\n",
    "tab\there",
]


@pytest.fixture
def stub(manager: ThreadedManager) -> Iterator[pb.WindowServiceStub]:
    with grpc.insecure_channel(manager.target) as channel:
        yield pb.WindowServiceStub(channel)


def fails(code: grpc.StatusCode, call: Callable[[], object]) -> grpc.RpcError:
    """Run `call`, which must fail with exactly `code` and a non-empty message."""
    with pytest.raises(grpc.RpcError) as caught:
        result = call()
        if isinstance(result, Iterator):  # a server stream fails when read
            list(result)
    error = caught.value
    assert error.code() == code, f"{error.code()} ({error.details()}), expected {code}"
    assert error.code() not in (Code.UNKNOWN, Code.INTERNAL)
    assert error.details(), "the status carries no message"
    return error


def header(
    name: str = "w", chunks: Sequence[InMemoryChunk] = CHUNKS, **fields: object
) -> pb.FreezeHeader:
    made = build_header(name, chunks, fingerprint=FINGERPRINT, token_ids=IDS)
    for key, value in fields.items():
        if key == "fingerprint":
            made.ClearField("fingerprint")
            if value is not None:
                made.fingerprint.CopyFrom(value)  # type: ignore[arg-type]
        elif key in ("chunk_digests", "token_ids"):
            made.ClearField(key)
            getattr(made, key).extend(value)  # type: ignore[call-overload]
        elif key == "tags":
            made.tags.update(value)  # type: ignore[call-overload]
        else:
            setattr(made, key, value)
    return made


def part(chunk: InMemoryChunk, **fields: object) -> pb.FreezeRequest:
    """The single-part Chunk message of `chunk`, with `fields` overridden."""
    (message,) = iter_parts(chunk, chunk.raw, RAW)
    for key, value in fields.items():
        setattr(message, key, value)
    return pb.FreezeRequest(chunk=message)


def good_requests(name: str = "w", **header_fields: object) -> list[pb.FreezeRequest]:
    return list(freeze_requests(header(name, **header_fields), CHUNKS))


def assert_nothing_stored(manager: ThreadedManager, stub: pb.WindowServiceStub) -> None:
    """No window and no chunk file (the clean-up of a cancelled call may lag a moment)."""
    data = manager.config.data_dir
    deadline = time.monotonic() + 5
    while chunk_files(data) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert chunk_files(data) == []
    assert list(stub.ListWindows(pb.ListWindowsRequest()).windows) == []
    missing = stub.FindMissingChunks(
        pb.FindMissingChunksRequest(digests=[c.digest for c in CHUNKS])
    )
    assert len(missing.missing_digests) == len(CHUNKS)


def freeze_fails(
    manager: ThreadedManager,
    stub: pb.WindowServiceStub,
    code: grpc.StatusCode,
    requests: Sequence[pb.FreezeRequest],
) -> grpc.RpcError:
    error = fails(code, lambda: stub.Freeze(iter(requests)))
    assert_nothing_stored(manager, stub)
    return error


# -- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_invalid_names_are_refused_everywhere(
    manager: ThreadedManager, stub: pb.WindowServiceStub, bad: str
) -> None:
    freeze_fails(manager, stub, Code.INVALID_ARGUMENT, good_requests(bad))
    if bad:  # an empty parent means "no lineage"
        freeze_fails(manager, stub, Code.INVALID_ARGUMENT, good_requests("ok", parent=bad))
    stub.Freeze(iter(good_requests("src")))
    fails(Code.INVALID_ARGUMENT, lambda: stub.GetWindow(pb.GetWindowRequest(name=bad)))
    fails(Code.INVALID_ARGUMENT, lambda: stub.Thaw(pb.ThawRequest(name=bad)))
    fails(Code.INVALID_ARGUMENT, lambda: stub.DeleteWindow(pb.DeleteWindowRequest(name=bad)))
    error = fails(
        Code.INVALID_ARGUMENT,
        lambda: stub.CloneWindow(pb.CloneWindowRequest(source_name=bad, new_name="copy")),
    )
    assert from_rpc_error(error).field == "source_name"
    error = fails(
        Code.INVALID_ARGUMENT,
        lambda: stub.CloneWindow(pb.CloneWindowRequest(source_name="src", new_name=bad)),
    )
    assert from_rpc_error(error).field == "new_name"
    assert [w.name for w in stub.ListWindows(pb.ListWindowsRequest()).windows] == ["src"]


def test_longest_valid_name_works(stub: pb.WindowServiceStub) -> None:
    name = "A-z_0." + "x" * 122
    assert len(name) == 128
    stub.Freeze(iter(good_requests(name)))
    assert stub.GetWindow(pb.GetWindowRequest(name=name)).window.name == name


# -- existing and unknown windows -----------------------------------------------------------


def test_existing_name_needs_replace(manager: ThreadedManager, stub: pb.WindowServiceStub) -> None:
    data = manager.config.data_dir
    stub.Freeze(iter(good_requests("w")))
    old_files = chunk_files(data)
    error = fails(Code.ALREADY_EXISTS, lambda: stub.Freeze(iter(good_requests("w"))))
    assert from_rpc_error(error).reason == "WINDOW_EXISTS"
    assert chunk_files(data) == old_files

    new_chunks = synthetic_chunks(TOKENS, seed=8)
    requests = list(freeze_requests(header("w", new_chunks, replace=True), new_chunks))
    replaced = stub.Freeze(iter(requests))
    assert replaced.chunks_received == len(new_chunks)
    thawed = [m.chunk.data for m in stub.Thaw(pb.ThawRequest(name="w")) if m.HasField("chunk")]
    assert thawed == [c.raw for c in new_chunks]
    # The old content is gone: its files were collected, only the new ones remain.
    assert not set(old_files) & set(chunk_files(data))
    assert len(chunk_files(data)) == len(new_chunks)
    assert [w.name for w in stub.ListWindows(pb.ListWindowsRequest()).windows] == ["w"]


def test_unknown_names_are_not_found(stub: pb.WindowServiceStub) -> None:
    fails(Code.NOT_FOUND, lambda: stub.GetWindow(pb.GetWindowRequest(name="nope")))
    fails(Code.NOT_FOUND, lambda: stub.Thaw(pb.ThawRequest(name="nope")))
    fails(Code.NOT_FOUND, lambda: stub.DeleteWindow(pb.DeleteWindowRequest(name="nope")))
    fails(
        Code.NOT_FOUND,
        lambda: stub.CloneWindow(pb.CloneWindowRequest(source_name="nope", new_name="copy")),
    )
    stub.Freeze(iter(good_requests("src")))
    stub.CloneWindow(pb.CloneWindowRequest(source_name="src", new_name="copy"))
    fails(
        Code.ALREADY_EXISTS,
        lambda: stub.CloneWindow(pb.CloneWindowRequest(source_name="src", new_name="copy")),
    )
    fails(
        Code.INVALID_ARGUMENT,
        lambda: stub.Thaw(pb.ThawRequest(name="src", first_chunk=len(CHUNKS))),
    )


# -- broken freeze streams ------------------------------------------------------------------


def _digest_mismatch() -> list[pb.FreezeRequest]:
    flipped = bytearray(CHUNKS[1].raw)
    flipped[100] ^= 0xFF
    return [
        pb.FreezeRequest(header=header()),
        part(CHUNKS[0]),
        part(CHUNKS[1], data=bytes(flipped)),
    ]


def _compressed_garbage() -> list[pb.FreezeRequest]:
    packed = encode(CHUNKS[0].raw, BYTEPLANE_ZSTD, 2)
    garbage = packed[: len(packed) // 2] + bytes(len(packed) - len(packed) // 2)
    return [
        pb.FreezeRequest(header=header()),
        part(CHUNKS[0], codec=BYTEPLANE_ZSTD, encoded_size=len(garbage), data=garbage),
    ]


def _split(chunk: InMemoryChunk) -> list[pb.FreezeRequest]:
    return [pb.FreezeRequest(chunk=m) for m in iter_parts(chunk, chunk.raw, RAW, 64 << 10)]


_H = pb.FreezeRequest(header=header())
_C0, _C1 = part(CHUNKS[0]), part(CHUNKS[1])
_FP_NO_DTYPE = pb.ModelFingerprint(num_layers=4, num_kv_heads=2, head_dim=64)


def _fingerprint(**fields: int) -> pb.ModelFingerprint:
    made = pb.ModelFingerprint()
    made.CopyFrom(FINGERPRINT)
    for key, value in fields.items():
        setattr(made, key, value)
    return made


BROKEN_STREAMS: dict[str, tuple[grpc.StatusCode, Callable[[], list[pb.FreezeRequest]]]] = {
    "empty stream": (Code.INVALID_ARGUMENT, lambda: []),
    "chunk before header": (Code.INVALID_ARGUMENT, lambda: [_C0, _H, _C1]),
    "second header": (Code.INVALID_ARGUMENT, lambda: [_H, _C0, _H, _C1]),
    "chunks out of order": (Code.INVALID_ARGUMENT, lambda: [_H, _C1, _C0]),
    "duplicated chunk": (Code.INVALID_ARGUMENT, lambda: [_H, _C0, _C0, _C1]),
    "chunk index out of range": (
        Code.INVALID_ARGUMENT,
        lambda: [_H, _C0, _C1, part(CHUNKS[1], index=2)],
    ),
    "chunk digest not the header's": (
        Code.INVALID_ARGUMENT,
        lambda: [_H, part(CHUNKS[0], digest=CHUNKS[1].digest)],
    ),
    "chunk digest of 31 bytes": (
        Code.INVALID_ARGUMENT,
        lambda: [_H, part(CHUNKS[0], digest=CHUNKS[0].digest[:31])],
    ),
    "header digest of 31 bytes": (
        Code.INVALID_ARGUMENT,
        lambda: [pb.FreezeRequest(header=header(chunk_digests=[CHUNKS[0].digest, b"\x01" * 31]))],
    ),
    "raw_size not the fingerprint's": (
        Code.INVALID_ARGUMENT,
        lambda: [
            _H,
            part(CHUNKS[0], raw_size=CHUNKS[0].raw_size * 2, encoded_size=CHUNKS[0].raw_size * 2),
        ],
    ),
    "token_count not the header's": (
        Code.INVALID_ARGUMENT,
        lambda: [_H, _C0, part(CHUNKS[1], token_count=256)],
    ),
    "token_start not the header's": (
        Code.INVALID_ARGUMENT,
        lambda: [_H, _C0, part(CHUNKS[1], token_start=255)],
    ),
    "encoded_size larger than raw for raw codec": (
        Code.INVALID_ARGUMENT,
        lambda: [_H, part(CHUNKS[0], encoded_size=CHUNKS[0].raw_size + 1)],
    ),
    "codec unspecified": (Code.INVALID_ARGUMENT, lambda: [_H, part(CHUNKS[0], codec=0)]),
    "codec unknown": (Code.INVALID_ARGUMENT, lambda: [_H, part(CHUNKS[0], codec=99)]),
    "compressed data that does not decode": (Code.INVALID_ARGUMENT, _compressed_garbage),
    "stream ends mid-chunk": (Code.INVALID_ARGUMENT, lambda: [_H, *_split(CHUNKS[0])[:-1]]),
    "part at a wrong offset": (
        Code.INVALID_ARGUMENT,
        lambda: [_H, *(lambda p: [p[0], p[2], p[1], *p[3:]])(_split(CHUNKS[0]))],
    ),
    "part of another chunk interleaved": (
        Code.INVALID_ARGUMENT,
        lambda: [_H, _split(CHUNKS[0])[0], _C1],
    ),
    "digest mismatch": (Code.DATA_LOSS, _digest_mismatch),
    "fingerprint missing": (
        Code.INVALID_ARGUMENT,
        lambda: [pb.FreezeRequest(header=header(fingerprint=None)), _C0, _C1],
    ),
    "fingerprint kv_dtype unset": (
        Code.INVALID_ARGUMENT,
        lambda: [pb.FreezeRequest(header=header(fingerprint=_fingerprint(kv_dtype=0))), _C0, _C1],
    ),
    "fingerprint kv_dtype unknown": (
        Code.INVALID_ARGUMENT,
        lambda: [pb.FreezeRequest(header=header(fingerprint=_fingerprint(kv_dtype=42))), _C0, _C1],
    ),
    "fingerprint num_layers zero": (
        Code.INVALID_ARGUMENT,
        lambda: [pb.FreezeRequest(header=header(fingerprint=_fingerprint(num_layers=0))), _C0],
    ),
    "fingerprint num_kv_heads zero": (
        Code.INVALID_ARGUMENT,
        lambda: [pb.FreezeRequest(header=header(fingerprint=_fingerprint(num_kv_heads=0))), _C0],
    ),
    "fingerprint head_dim zero": (
        Code.INVALID_ARGUMENT,
        lambda: [pb.FreezeRequest(header=header(fingerprint=_fingerprint(head_dim=0))), _C0],
    ),
    "token count needs more digests": (
        Code.INVALID_ARGUMENT,
        lambda: [pb.FreezeRequest(header=header(chunk_digests=[CHUNKS[0].digest])), _C0],
    ),
    "token count needs fewer digests": (
        Code.INVALID_ARGUMENT,
        lambda: [
            pb.FreezeRequest(header=header(chunk_digests=[c.digest for c in CHUNKS] * 2)),
            _C0,
            _C1,
        ],
    ),
    "no tokens": (
        Code.INVALID_ARGUMENT,
        lambda: [pb.FreezeRequest(header=header(token_ids=[], chunk_digests=[]))],
    ),
    "chunk_tokens zero": (
        Code.INVALID_ARGUMENT,
        lambda: [pb.FreezeRequest(header=header(chunk_tokens=0)), _C0, _C1],
    ),
    "chunk_tokens not a multiple of the block size": (
        Code.INVALID_ARGUMENT,
        lambda: [pb.FreezeRequest(header=header(chunk_tokens=250)), _C0, _C1],
    ),
    "ttl beyond ten years": (
        Code.INVALID_ARGUMENT,
        lambda: [pb.FreezeRequest(header=header(ttl_seconds=1 << 40)), _C0, _C1],
    ),
    "too many tags": (
        Code.INVALID_ARGUMENT,
        lambda: [
            pb.FreezeRequest(header=header(tags={f"k{i}": "v" for i in range(65)})),
            _C0,
            _C1,
        ],
    ),
    "chunk neither sent nor stored": (Code.FAILED_PRECONDITION, lambda: [_H, _C0]),
    "header digest of a chunk nobody has": (
        Code.FAILED_PRECONDITION,
        lambda: [
            pb.FreezeRequest(header=header(chunk_digests=[CHUNKS[0].digest, b"\x07" * 32])),
            _C0,
        ],
    ),
}


@pytest.mark.parametrize("case", list(BROKEN_STREAMS))
def test_broken_freeze_stream(
    manager: ThreadedManager, stub: pb.WindowServiceStub, case: str
) -> None:
    code, requests = BROKEN_STREAMS[case]
    freeze_fails(manager, stub, code, requests())
    # The manager is unharmed: the same window freezes cleanly afterwards.
    stub.Freeze(iter(good_requests("w")))
    assert len(chunk_files(manager.config.data_dir)) == len(CHUNKS)


def test_digest_mismatch_names_the_chunk(
    manager: ThreadedManager, stub: pb.WindowServiceStub
) -> None:
    error = freeze_fails(manager, stub, Code.DATA_LOSS, _digest_mismatch())
    typed = from_rpc_error(error)
    assert typed.reason == "DIGEST_MISMATCH" and "chunk 1" in typed.message


@pytest.mark.parametrize("where", ["first chunk", "after the last chunk"])
def test_message_over_the_size_limit(
    manager: ThreadedManager, stub: pb.WindowServiceStub, where: str
) -> None:
    """A message over the manager's 16 MiB limit is refused by gRPC itself with
    RESOURCE_EXHAUSTED ("Received message larger than max"): the status gRPC documents for
    an oversized message, before any of the manager's code sees the bytes."""
    big = bytes(MAX_MESSAGE_BYTES + 1)
    oversized = pb.FreezeRequest(
        chunk=pb.Chunk(
            index=0,
            token_count=256,
            digest=CHUNKS[0].digest,
            codec=RAW,
            raw_size=len(big),
            encoded_size=len(big),
            data=big,
        )
    )
    requests = [_H, oversized] if where == "first chunk" else [_H, _C0, _C1, oversized]
    error = freeze_fails(manager, stub, Code.RESOURCE_EXHAUSTED, requests)
    assert "larger than max" in error.details()


# -- bytes that are not a message -----------------------------------------------------------

BAD_UTF8_NAME = b"\x0a\x02\xff\xfe"  # field 1 (name, a string) holding invalid UTF-8
CORRUPT = b"\xff\xff\xff"  # not a protobuf at all


def _raw(channel: grpc.Channel, kind: str, method: str) -> Callable[..., object]:
    def same(raw: bytes) -> bytes:
        return raw

    make = getattr(channel, kind)
    return make(  # type: ignore[no-any-return]
        f"/cwm.v1.WindowService/{method}", request_serializer=same, response_deserializer=same
    )


@pytest.mark.parametrize("raw", [BAD_UTF8_NAME, CORRUPT], ids=["bad-utf8", "corrupt"])
def test_malformed_messages_are_invalid_argument(
    manager: ThreadedManager, stub: pb.WindowServiceStub, raw: bytes
) -> None:
    """A request gRPC cannot parse is the client's mistake, not UNKNOWN or INTERNAL."""
    with grpc.insecure_channel(manager.target) as channel:
        for method in ("GetWindow", "DeleteWindow", "CloneWindow", "ListWindows"):
            call = _raw(channel, "unary_unary", method)
            # ListWindowsRequest's first string field is page_token (field 2).
            sent = b"\x12" + raw[1:] if method == "ListWindows" and raw is not CORRUPT else raw
            error = fails(Code.INVALID_ARGUMENT, lambda c=call, r=sent: c(r))  # type: ignore[misc]
            assert from_rpc_error(error).reason == "MALFORMED_REQUEST"
        if raw is CORRUPT:
            find = _raw(channel, "unary_unary", "FindMissingChunks")
            fails(Code.INVALID_ARGUMENT, lambda: find(raw))
        thaw = _raw(channel, "unary_stream", "Thaw")
        fails(Code.INVALID_ARGUMENT, lambda: thaw(raw))
        freeze = _raw(channel, "stream_unary", "Freeze")
        header_bytes = pb.FreezeRequest(header=header()).SerializeToString()
        first = raw if raw is CORRUPT else b"\x0a" + bytes([len(raw)]) + raw  # header.name
        fails(Code.INVALID_ARGUMENT, lambda: freeze(iter([first])))
        # Mid-stream: a good header and chunk, then bytes that do not parse.
        chunk_bytes = _C0.SerializeToString()
        fails(Code.INVALID_ARGUMENT, lambda: freeze(iter([header_bytes, chunk_bytes, CORRUPT])))
    assert_nothing_stored(manager, stub)


# -- lists and lookups ----------------------------------------------------------------------


def test_bad_page_token_and_page_size(stub: pb.WindowServiceStub) -> None:
    stub.Freeze(iter(good_requests("w")))
    for token in ["not-base64!", "Li4veA==", "////", "x"]:
        fails(
            Code.INVALID_ARGUMENT,
            lambda t=token: stub.ListWindows(pb.ListWindowsRequest(page_token=t)),
        )  # type: ignore[misc]
    fails(Code.INVALID_ARGUMENT, lambda: stub.ListWindows(pb.ListWindowsRequest(page_size=1001)))
    assert len(stub.ListWindows(pb.ListWindowsRequest(page_size=1000)).windows) == 1


@pytest.mark.parametrize("size", [0, 31, 33])
def test_find_missing_chunks_with_a_bad_digest(stub: pb.WindowServiceStub, size: int) -> None:
    error = fails(
        Code.INVALID_ARGUMENT,
        lambda: stub.FindMissingChunks(
            pb.FindMissingChunksRequest(digests=[CHUNKS[0].digest, b"\x01" * size])
        ),
    )
    assert from_rpc_error(error).field == "digests[1]"


def test_find_missing_chunks_with_too_many_digests(stub: pb.WindowServiceStub) -> None:
    digests = [digest(i.to_bytes(4, "little")) for i in range(100_001)]
    fails(
        Code.INVALID_ARGUMENT,
        lambda: stub.FindMissingChunks(pb.FindMissingChunksRequest(digests=digests)),
    )


def test_bad_clone_labels(stub: pb.WindowServiceStub) -> None:
    stub.Freeze(iter(good_requests("src")))
    fails(
        Code.INVALID_ARGUMENT,
        lambda: stub.CloneWindow(
            pb.CloneWindowRequest(source_name="src", new_name="c", ttl_seconds=1 << 40)
        ),
    )
    fails(
        Code.INVALID_ARGUMENT,
        lambda: stub.CloneWindow(
            pb.CloneWindowRequest(source_name="src", new_name="c", description="d" * 5000)
        ),
    )
    assert [w.name for w in stub.ListWindows(pb.ListWindowsRequest()).windows] == ["src"]
