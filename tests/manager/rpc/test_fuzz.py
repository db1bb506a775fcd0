"""Fuzzing every RPC of WindowService and SessionService against one real manager.

Hypothesis generates, per RPC, at least 1000 requests: structured messages built from the
proto descriptors (any field set or unset, unknown enum values, odd strings, digests of
stored chunks, names of stored windows), valid messages with bytes flipped or cut off, and
plain garbage, all sent as raw bytes over one shared channel with identity serializers, so
no client-side check filters anything. Freeze and Connect get streams of such messages, and
Freeze also gets valid chunk streams broken in every way hypothesis can combine (reordered,
dropped, duplicated or truncated parts, wrong digests, sizes, offsets and codecs).

The manager runs with authentication on; most calls carry the admin token, some add or
carry only random `authorization` and `x-request-id` metadata.

Whatever arrives, the manager must answer with a precise status: never UNKNOWN or INTERNAL
(a bug), never UNAVAILABLE or DEADLINE_EXCEEDED (a crash or a hang). After each RPC's run a
normal freeze and thaw still work.

Bugs this found (fixed): a Connect whose client closed its side right after a valid hello
answered INTERNAL (session_servicer.Connect read the result of a queue read it had only
asked to cancel).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cwm_client import SessionClient, WindowClient, pb
from cwm_client._common import build_header, freeze_requests
from cwm_client.chunks import chunks_from_bytes
from cwm_server.manager.config import ManagerConfig, ServerOptions
from cwm_server.manager.rpc import auth
from tests.helpers import ThreadedManager

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1000"))
"""Per RPC; raise it for a longer hunt
(`FUZZ_EXAMPLES=20000 pytest tests/manager/rpc/test_fuzz.py`)."""
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)
FORBIDDEN = {
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
CALL_TIMEOUT_S = 20.0
ADMIN = auth.mint_token()
AUTH = (("authorization", f"Bearer {ADMIN}"),)

# A tiny engine shape: 16 bytes of KV per token, 256-byte chunks of 16 tokens.
TINY = pb.ModelFingerprint(
    model_id="fuzz-tiny",
    kv_dtype=pb.KvDtype.KV_DTYPE_BFLOAT16,
    num_layers=1,
    num_kv_heads=1,
    head_dim=4,
    engine_name="fuzz",
    block_size=16,
)
CHUNK_TOKENS = 16
TOKENS = 40  # chunks of 16, 16 and 8 tokens
IDS = list(range(100, 100 + TOKENS))
SEED_CHUNKS = chunks_from_bytes(
    [bytes((i * 7 + j) % 251 for j in range(16 * n)) for i, n in enumerate((16, 16, 8))],
    CHUNK_TOKENS,
    TOKENS,
)
SEED = "seed"
NAMES = [SEED, "w", "x.y-z_1", "", ".", "..", "a/b", "a" * 128, "a" * 129, "窓", "\x00"]
DIGESTS = [c.digest for c in SEED_CHUNKS]

WINDOWS = "/cwm.v1.WindowService/"
SESSIONS = "/cwm.v1.SessionService/"
RPCS: dict[str, tuple[str, type[Message]]] = {
    WINDOWS + "Freeze": ("stream_unary", pb.FreezeRequest),
    WINDOWS + "Thaw": ("unary_stream", pb.ThawRequest),
    WINDOWS + "FindMissingChunks": ("unary_unary", pb.FindMissingChunksRequest),
    WINDOWS + "ListWindows": ("unary_unary", pb.ListWindowsRequest),
    WINDOWS + "GetWindow": ("unary_unary", pb.GetWindowRequest),
    WINDOWS + "CloneWindow": ("unary_unary", pb.CloneWindowRequest),
    WINDOWS + "DeleteWindow": ("unary_unary", pb.DeleteWindowRequest),
    WINDOWS + "OfferBulkFreeze": ("unary_unary", pb.OfferBulkFreezeRequest),
    SESSIONS + "Connect": ("stream_stream", pb.ConnectRequest),
    SESSIONS + "ListAgents": ("unary_unary", pb.ListAgentsRequest),
    SESSIONS + "ListSessions": ("unary_unary", pb.ListSessionsRequest),
    SESSIONS + "FreezeSession": ("unary_unary", pb.FreezeSessionRequest),
    SESSIONS + "ThawWindow": ("unary_unary", pb.ThawWindowRequest),
}


def test_every_rpc_is_covered() -> None:
    for service in ("WindowService", "SessionService"):
        descriptor = pb.FreezeRequest.DESCRIPTOR.file.pool.FindServiceByName(f"cwm.v1.{service}")
        for method in descriptor.methods:
            assert f"/cwm.v1.{service}/{method.name}" in RPCS


# -- message strategies built from the descriptors ------------------------------------------

_INT_BOUNDS = {
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
}


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.sampled_from(NAMES), st.text(max_size=12))
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.sampled_from(DIGESTS), st.binary(max_size=40), st.just(bytes(32)))
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_ENUM:
        return st.integers(-2, 12)  # unknown values too (open enums)
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, width=32)
    low, high = _INT_BOUNDS[kind]
    small = st.integers(max(low, -3), min(high, 600))
    return st.one_of(small, small, st.integers(low, high), st.sampled_from([low, high]))


def _message_class(descriptor: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)  # type: ignore[no-any-return]


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any] | None:
    if field.message_type is None:
        single: st.SearchStrategy[Any] = _scalar(field)
    else:
        if field.message_type.GetOptions().map_entry:
            key = _scalar(field.message_type.fields_by_name["key"])
            value_field = field.message_type.fields_by_name["value"]
            value = _value(value_field, depth + 1)
            if value is None:
                return None
            return st.dictionaries(key, value, max_size=3)
        if depth >= 3:
            return None
        single = messages(_message_class(field.message_type), depth + 1)
    if field.is_repeated:
        return st.lists(single, max_size=5)
    return single


def _set(message: Message, field: FieldDescriptor, value: Any) -> None:
    target = getattr(message, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_field = field.message_type.fields_by_name["value"]
        for key, item in value.items():
            if value_field.message_type is None:
                target[key] = item
            else:
                target[key].CopyFrom(item)
    elif field.is_repeated:
        if field.message_type is None:
            target.extend(value)
        else:
            for item in value:
                target.add().CopyFrom(item)
    elif field.message_type is not None:
        target.CopyFrom(value)
    else:
        setattr(message, field.name, value)


_MESSAGE_CACHE: dict[tuple[str, int], st.SearchStrategy[Message]] = {}


def messages(cls: type[Message], depth: int = 0) -> st.SearchStrategy[Message]:
    """Any message of `cls`: a random subset of its fields, each with a random value."""
    key = (cls.DESCRIPTOR.full_name, depth)
    if key in _MESSAGE_CACHE:
        return _MESSAGE_CACHE[key]
    fields = [
        (f, strategy) for f in cls.DESCRIPTOR.fields if (strategy := _value(f, depth)) is not None
    ]

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = cls()
        chosen = draw(st.lists(st.sampled_from(range(len(fields))), unique=True, max_size=6))
        for index in chosen:
            field, strategy = fields[index]
            _set(message, field, draw(strategy))
        return message

    strategy = build() if fields else st.just(cls())
    _MESSAGE_CACHE[key] = strategy
    return strategy


def _mutate(raw: bytes, data: st.DataObject) -> bytes:
    """Flip, cut or splice the bytes of a serialized message."""
    how = data.draw(st.sampled_from(["flip", "cut", "splice", "append"]))
    if not raw:
        return data.draw(st.binary(min_size=1, max_size=8))
    at = data.draw(st.integers(0, len(raw) - 1))
    if how == "flip":
        return raw[:at] + bytes([raw[at] ^ data.draw(st.integers(1, 255))]) + raw[at + 1 :]
    if how == "cut":
        return raw[:at]
    if how == "splice":
        return raw[:at] + data.draw(st.binary(max_size=8)) + raw[at:]
    return raw + data.draw(st.binary(min_size=1, max_size=8))


_HEADER_VALUE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=80)
_EXTRA = st.lists(
    st.tuples(st.sampled_from(["authorization", "x-request-id", "x-other"]), _HEADER_VALUE),
    max_size=2,
).map(tuple)
METADATA: st.SearchStrategy[tuple[tuple[str, str], ...]] = st.one_of(
    st.just(AUTH), st.just(AUTH), st.just(AUTH), _EXTRA.map(lambda e: AUTH + e), _EXTRA
)
"""Mostly the admin token (so requests reach the servicers), sometimes random headers."""


def payloads(cls: type[Message]) -> st.SearchStrategy[bytes]:
    """Bytes of one request: a structured message, a mutated one, or garbage."""
    structured = messages(cls).map(lambda m: m.SerializeToString())

    @st.composite
    def mutated(draw: st.DrawFn) -> bytes:
        return _mutate(draw(structured), draw(st.data()))

    return st.one_of(structured, structured, mutated(), st.binary(max_size=64))


# -- the manager and the calls --------------------------------------------------------------


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedManager]:
    root: Path = tmp_path_factory.mktemp("fuzz")
    auth_file = root / "auth.toml"
    auth_file.write_text(auth.token_line(ADMIN, "fuzz", "admin"))
    running = ThreadedManager(
        ManagerConfig(data_dir=root / "data", listen="127.0.0.1:0", fsync=False),
        ServerOptions(auth_file=auth_file),
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def channel(manager: ThreadedManager) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(manager.target) as shared:
        yield shared


def _same(raw: bytes) -> bytes:
    return raw


def call(
    channel: grpc.Channel,
    method: str,
    requests: list[bytes],
    metadata: tuple[tuple[str, str], ...] = AUTH,
) -> grpc.StatusCode:
    """Send raw request bytes; return the status (OK on success)."""
    kind, _ = RPCS[method]
    options: dict[str, Any] = {"timeout": CALL_TIMEOUT_S, "metadata": metadata}
    callable_ = getattr(channel, kind)(
        method, request_serializer=_same, response_deserializer=_same
    )
    try:
        if kind == "unary_unary":
            callable_(requests[0], **options)
        elif kind == "unary_stream":
            for _ in callable_(requests[0], **options):
                pass
        else:
            result = callable_(iter(requests), **options)
            if kind == "stream_stream":
                for _ in result:
                    pass
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        assert code not in FORBIDDEN, f"{method} answered {code.name}: {exc.details()}"
        assert exc.details(), f"{method} answered {code.name} without a message"
        return code
    return grpc.StatusCode.OK


def ensure_seed(target: str) -> None:
    """The window fuzzed names often hit (a delete or a replace may have removed it)."""
    with WindowClient(target, timeout=30, token=ADMIN) as client:
        client.freeze(
            SEED,
            SEED_CHUNKS,
            fingerprint=TINY,
            token_ids=IDS,
            chunk_tokens=CHUNK_TOKENS,
            replace=True,
        )


def still_serves(target: str) -> None:
    """A normal freeze and thaw, bytes verified."""
    name = f"after-{time.monotonic_ns()}"
    with WindowClient(target, timeout=30, token=ADMIN) as client:
        client.freeze(name, SEED_CHUNKS, fingerprint=TINY, token_ids=IDS, chunk_tokens=CHUNK_TOKENS)
        with client.thaw(name) as stream:
            assert [c.data for c in stream] == [c.raw for c in SEED_CHUNKS]
        client.delete(name)


UNARY = [m for m, (kind, _) in RPCS.items() if kind in ("unary_unary", "unary_stream")]


@pytest.mark.parametrize("method", UNARY, ids=[m.rsplit("/", 1)[1] for m in UNARY])
def test_unary_rpc_fuzz(manager: ThreadedManager, channel: grpc.Channel, method: str) -> None:
    ensure_seed(manager.target)
    seen: set[grpc.StatusCode] = set()
    calls = []

    @FUZZ
    @given(payloads(RPCS[method][1]), METADATA)
    def run(raw: bytes, metadata: tuple[tuple[str, str], ...]) -> None:
        seen.add(call(channel, method, [raw], metadata))
        calls.append(1)

    run()
    assert len(calls) >= EXAMPLES
    still_serves(manager.target)
    assert grpc.StatusCode.INVALID_ARGUMENT in seen or method.endswith("ListAgents")


@pytest.mark.parametrize(
    "method", [WINDOWS + "Freeze", SESSIONS + "Connect"], ids=["Freeze", "Connect"]
)
def test_client_stream_fuzz(manager: ThreadedManager, channel: grpc.Channel, method: str) -> None:
    """Streams of 0-5 messages, each structured, mutated or garbage."""
    ensure_seed(manager.target)
    calls = []

    @FUZZ
    @given(st.lists(payloads(RPCS[method][1]), max_size=5), METADATA)
    def run(raws: list[bytes], metadata: tuple[tuple[str, str], ...]) -> None:
        call(channel, method, raws, metadata)
        calls.append(1)

    run()
    assert len(calls) >= EXAMPLES
    still_serves(manager.target)


# -- malformed chunk streams ----------------------------------------------------------------


def _valid_stream(name: str, replace: bool, part_bytes: int) -> list[pb.FreezeRequest]:
    header = build_header(
        name,
        SEED_CHUNKS,
        fingerprint=TINY,
        token_ids=IDS,
        chunk_tokens=CHUNK_TOKENS,
        replace=replace,
    )
    return list(freeze_requests(header, SEED_CHUNKS, part_bytes=part_bytes))


_CHUNK_FIELDS = {
    "index": st.integers(0, 5) | st.integers(0, 2**32 - 1),
    "token_start": st.integers(0, 64) | st.integers(0, 2**64 - 1),
    "token_count": st.integers(0, 20) | st.integers(0, 2**32 - 1),
    "digest": st.sampled_from(DIGESTS) | st.binary(max_size=40),
    "codec": st.integers(-1, 6),
    "raw_size": st.integers(0, 600) | st.integers(0, 2**64 - 1),
    "encoded_size": st.integers(0, 600) | st.integers(0, 2**64 - 1),
    "data_offset": st.integers(0, 600) | st.integers(0, 2**64 - 1),
    "data": st.binary(max_size=300),
}
_HEADER_FIELDS = {
    "chunk_tokens": st.integers(0, 64),
    "token_ids": st.lists(st.integers(0, 2**32 - 1), max_size=50),
    "chunk_digests": st.lists(st.sampled_from(DIGESTS) | st.binary(max_size=33), max_size=4),
    "upload_id": st.sampled_from(["", "up-1", "up-2", "bad id!"]),
    "stage_only": st.booleans(),
    "parent": st.sampled_from(NAMES),
}


@st.composite
def broken_streams(draw: st.DrawFn) -> list[bytes]:
    name = draw(st.sampled_from([SEED, "broken", "broken2"]))
    messages_ = _valid_stream(name, draw(st.booleans()), draw(st.sampled_from([64, 100, 256])))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(
            st.sampled_from(["swap", "drop", "dup", "chunk-field", "header-field", "truncate"])
        )
        at = draw(st.integers(0, len(messages_) - 1))
        if op == "swap":
            other = draw(st.integers(0, len(messages_) - 1))
            messages_[at], messages_[other] = messages_[other], messages_[at]
        elif op == "drop" and len(messages_) > 1:
            del messages_[at]
        elif op == "dup":
            messages_.insert(at, messages_[at])
        elif op == "truncate" and messages_[at].WhichOneof("payload") == "chunk":
            copy = pb.FreezeRequest()
            copy.CopyFrom(messages_[at])
            copy.chunk.data = copy.chunk.data[: draw(st.integers(0, len(copy.chunk.data)))]
            messages_[at] = copy
        elif op == "chunk-field" and messages_[at].WhichOneof("payload") == "chunk":
            copy = pb.FreezeRequest()
            copy.CopyFrom(messages_[at])
            field = draw(st.sampled_from(sorted(_CHUNK_FIELDS)))
            setattr(copy.chunk, field, draw(_CHUNK_FIELDS[field]))
            messages_[at] = copy
        elif op == "header-field":
            copy = pb.FreezeRequest()
            copy.CopyFrom(messages_[0])
            if copy.WhichOneof("payload") == "header":
                field = draw(st.sampled_from(sorted(_HEADER_FIELDS)))
                value = draw(_HEADER_FIELDS[field])
                if isinstance(value, list):
                    copy.header.ClearField(field)
                    getattr(copy.header, field).extend(value)
                else:
                    setattr(copy.header, field, value)
                messages_[0] = copy
    raws = [m.SerializeToString() for m in messages_]
    if draw(st.integers(0, 9)) == 0:  # now and then, bytes that are no message at all
        at = draw(st.integers(0, len(raws) - 1))
        raws[at] = _mutate(raws[at], draw(st.data()))
    if draw(st.integers(0, 9)) == 0:  # or a stream that ends part-way
        raws = raws[: draw(st.integers(0, len(raws)))]
    return raws


def test_malformed_chunk_streams(manager: ThreadedManager, channel: grpc.Channel) -> None:
    ensure_seed(manager.target)
    seen: set[grpc.StatusCode] = set()
    calls = []

    @FUZZ
    @given(broken_streams())
    def run(raws: list[bytes]) -> None:
        seen.add(call(channel, WINDOWS + "Freeze", raws))
        calls.append(1)

    run()
    assert len(calls) >= EXAMPLES
    still_serves(manager.target)
    assert {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS} & seen


@st.composite
def agent_conversations(draw: st.DrawFn) -> list[bytes]:
    """A Connect stream that gets past the hello: a valid AgentHello (now and then with a
    random fingerprint), then reports, results and anything else, structured or not."""
    fingerprint = draw(st.one_of(st.just(TINY), messages(pb.ModelFingerprint)))
    hello = pb.ConnectRequest(
        hello=pb.AgentHello(
            agent_id=draw(st.sampled_from(["agent-1", "agent-2", "a" * 128])),
            fingerprint=fingerprint,  # type: ignore[arg-type]
            endpoint=draw(st.sampled_from(["", "http://127.0.0.1:1"])),
        )
    )
    rest = draw(st.lists(payloads(pb.ConnectRequest), max_size=5))
    return [hello.SerializeToString(), *rest]


def test_connected_agent_fuzz(manager: ThreadedManager, channel: grpc.Channel) -> None:
    calls = []

    @FUZZ
    @given(agent_conversations())
    def run(raws: list[bytes]) -> None:
        call(channel, SESSIONS + "Connect", raws)
        calls.append(1)

    run()
    assert len(calls) >= EXAMPLES
    still_serves(manager.target)
    with SessionClient(manager.target, token=ADMIN) as sessions:  # every stream ended
        assert sessions.list_agents() == []
