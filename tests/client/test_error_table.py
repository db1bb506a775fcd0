"""The status-code table is filled by the error classes themselves: every class that declares
a code comes back as itself from a real failed call, a subclass that keeps its parent's code
does not take the code over, and a second class declaring a taken code is refused."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_status import rpc_status

from cwm_client import errors
from cwm_client.errors import CwmError, FailedPrecondition, error_class, from_rpc_error

DECLARED = [
    cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, CwmError) and "code" in cls.__dict__
]
"""Every class of cwm_client.errors that declares its own code (CwmError's UNKNOWN too)."""

_METHOD = "/test.Errors/Raise"


def _raise_named(request: bytes, context: grpc.ServicerContext) -> bytes:
    """Fail the call with the rich status of the error class named by the request."""
    cls = getattr(errors, request.decode())
    error = cls("told to fail", reason="TOLD_TO", field="some_field", metadata={"k": "v"})
    context.abort_with_status(rpc_status.to_status(error.to_status()))
    raise AssertionError("abort_with_status returned")


@pytest.fixture
def channel() -> Iterator[grpc.Channel]:
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "test.Errors", {"Raise": grpc.unary_unary_rpc_method_handler(_raise_named)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as chan:
        yield chan
    server.stop(None)


def test_every_declared_code_has_its_own_class() -> None:
    codes = [cls.code for cls in DECLARED]
    assert len(codes) == len(set(codes))
    assert len(DECLARED) >= 15
    for cls in DECLARED:
        assert error_class(cls.code) is (CwmError if cls is CwmError else cls)


@pytest.mark.parametrize("cls", [c for c in DECLARED if c is not CwmError], ids=str)
def test_a_failed_call_comes_back_as_the_class_that_raised_it(
    channel: grpc.Channel, cls: type[CwmError]
) -> None:
    call = channel.unary_unary(_METHOD)
    with pytest.raises(grpc.RpcError) as caught:
        call(cls.__name__.encode(), timeout=10)
    error = from_rpc_error(caught.value)
    assert type(error) is cls
    assert error.code == cls.code
    assert (error.message, error.reason, error.field) == ("told to fail", "TOLD_TO", "some_field")
    assert error.metadata == {"k": "v"}


def test_a_code_without_a_class_comes_back_as_cwm_error_with_that_code() -> None:
    assert error_class(grpc.StatusCode.OUT_OF_RANGE) is CwmError


def test_a_subclass_that_keeps_its_parents_code_does_not_take_the_code_over() -> None:
    class SpecificPrecondition(FailedPrecondition):
        pass

    assert SpecificPrecondition.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error_class(grpc.StatusCode.FAILED_PRECONDITION) is FailedPrecondition


def test_a_second_class_declaring_a_taken_code_is_refused() -> None:
    with pytest.raises(TypeError, match="NOT_FOUND"):

        class AnotherNotFound(CwmError):
            code = grpc.StatusCode.NOT_FOUND

    assert error_class(grpc.StatusCode.NOT_FOUND) is errors.NotFound
