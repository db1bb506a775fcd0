"""Every client error carries `google.rpc.Status` details: an ErrorInfo (domain cwm.v1, a
reason) always, and a BadRequest naming the field when one field is at fault. Read with
grpcio-status, as any gRPC client would, over the raw generated stubs of both services."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from cwm_client import pb
from cwm_client.windows.freeze_stream import build_header, freeze_requests
from tests.helpers import FINGERPRINT, ThreadedManager, synthetic_chunks, token_ids

Code = grpc.StatusCode


@pytest.fixture
def channel(manager: ThreadedManager) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(manager.target) as chan:
        yield chan


def rich_status(call: Callable[[], object]) -> tuple[grpc.RpcError, status_pb2.Status]:
    with pytest.raises(grpc.RpcError) as caught:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None, f"{caught.value.code()} carries no google.rpc.Status"
    assert status.code == caught.value.code().value[0]
    assert status.message == caught.value.details()
    return caught.value, status


def details(status: status_pb2.Status) -> tuple[error_details_pb2.ErrorInfo, list[str]]:
    info = None
    fields: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
            assert all(v.description for v in bad.field_violations)
    assert info is not None, "no ErrorInfo"
    assert info.domain == "cwm.v1" and info.reason
    return info, fields


def test_window_service_errors_are_rich(manager: ThreadedManager, channel: grpc.Channel) -> None:
    stub = pb.WindowServiceStub(channel)
    chunks = synthetic_chunks(300)
    header = build_header("rich", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(300))
    stub.Freeze(freeze_requests(header, chunks), timeout=30)

    error, status = rich_status(lambda: stub.GetWindow(pb.GetWindowRequest(name="absent")))
    info, _ = details(status)
    assert error.code() == Code.NOT_FOUND
    assert info.reason == "WINDOW_NOT_FOUND" and info.metadata["window"] == "absent"

    error, status = rich_status(lambda: stub.GetWindow(pb.GetWindowRequest(name="a/b")))
    info, fields = details(status)
    assert error.code() == Code.INVALID_ARGUMENT and fields == ["name"]

    error, status = rich_status(
        lambda: stub.CloneWindow(pb.CloneWindowRequest(source_name="rich", new_name="rich"))
    )
    info, _ = details(status)
    assert error.code() == Code.ALREADY_EXISTS and info.reason == "WINDOW_EXISTS"

    error, status = rich_status(
        lambda: stub.FindMissingChunks(pb.FindMissingChunksRequest(digests=[b"short"]))
    )
    _, fields = details(status)
    assert error.code() == Code.INVALID_ARGUMENT and fields == ["digests[0]"]

    error, status = rich_status(
        lambda: stub.ListWindows(pb.ListWindowsRequest(page_token="not-a-token"))
    )
    _, fields = details(status)
    assert error.code() == Code.INVALID_ARGUMENT and fields == ["page_token"]

    error, status = rich_status(
        lambda: stub.Thaw(pb.ThawRequest(name="rich", first_chunk=99)),
    )
    _, fields = details(status)
    assert error.code() == Code.INVALID_ARGUMENT and fields == ["first_chunk"]

    bad_header = build_header("rich", chunks, fingerprint=pb.ModelFingerprint(), token_ids=[1])
    error, status = rich_status(lambda: stub.Freeze(iter([pb.FreezeRequest(header=bad_header)])))
    _, fields = details(status)
    assert error.code() == Code.INVALID_ARGUMENT and fields[0].startswith("fingerprint")

    error, status = rich_status(lambda: stub.Freeze(freeze_requests(header, chunks)))
    info, _ = details(status)
    assert error.code() == Code.ALREADY_EXISTS and info.reason == "WINDOW_EXISTS"

    # Bytes that are not a message at all: INVALID_ARGUMENT with a reason, never UNKNOWN.
    raw = channel.unary_unary("/cwm.v1.WindowService/GetWindow")
    error, status = rich_status(lambda: raw(b"\xff\xff\xff", timeout=10))
    info, _ = details(status)
    assert error.code() == Code.INVALID_ARGUMENT and info.reason == "MALFORMED_REQUEST"


def test_session_service_errors_are_rich(manager: ThreadedManager, channel: grpc.Channel) -> None:
    stub = pb.SessionServiceStub(channel)
    error, status = rich_status(
        lambda: stub.FreezeSession(pb.FreezeSessionRequest(session_id="s", window_name="a b"))
    )
    _, fields = details(status)
    assert error.code() == Code.INVALID_ARGUMENT and fields == ["window_name"]

    error, status = rich_status(
        lambda: stub.FreezeSession(pb.FreezeSessionRequest(session_id="s", window_name="w"))
    )
    info, _ = details(status)
    assert error.code() == Code.NOT_FOUND

    error, status = rich_status(lambda: stub.ThawWindow(pb.ThawWindowRequest(window_name="absent")))
    info, _ = details(status)
    assert error.code() == Code.NOT_FOUND and info.reason == "WINDOW_NOT_FOUND"

    # Connect is bidirectional: a first message that is not a hello is refused in kind.
    error, status = rich_status(
        lambda: stub.Connect(iter([pb.ConnectRequest(sessions=pb.SessionReport())]), timeout=10)
    )
    _, fields = details(status)
    assert error.code() == Code.INVALID_ARGUMENT and fields == ["hello"]


def test_unknown_methods_and_health_names_are_rich(channel: grpc.Channel) -> None:
    missing = channel.unary_unary("/cwm.v1.WindowService/NoSuchMethod")
    error, status = rich_status(lambda: missing(b"", timeout=10))
    info, _ = details(status)
    assert error.code() == Code.UNIMPLEMENTED and info.reason == "METHOD_NOT_FOUND"
    assert info.metadata["method"] == "/cwm.v1.WindowService/NoSuchMethod"

    health = health_pb2_grpc.HealthStub(channel)
    error, status = rich_status(
        lambda: health.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=10)
    )
    info, fields = details(status)
    assert error.code() == Code.NOT_FOUND and info.reason == "SERVICE_UNKNOWN"
    assert fields == ["service"]
