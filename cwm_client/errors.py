"""Typed exceptions and the one mapping between them and gRPC status codes.

The manager raises these exceptions from its domain code and an interceptor turns them into
a `google.rpc.Status` (code, message, ErrorInfo and BadRequest details); the SDK turns a
failed call back into the same class. One table serves both directions, so a code can never
mean one thing on the server and another in the client; each class declares its code and
registers itself in that table, so a class and its table entry cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

ERROR_DOMAIN = "cwm.v1"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"

_BY_CODE: dict[grpc.StatusCode, type[CwmError]] = {}
"""Filled by `CwmError.__init_subclass__` from each class that declares its own `code`."""


class CwmError(Exception):
    """Base of every error the SDK raises for a failed call."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Register a class that declares its own `code` as the one for that code, so the
        table is written once, by the class definitions. A subclass that keeps its parent's
        code (a more specific error of the same kind) is not registered; two classes
        declaring one code is a mistake caught at import."""
        super().__init_subclass__(**kwargs)
        if "code" not in cls.__dict__:
            return
        taken = _BY_CODE.get(cls.code)
        if taken is not None:
            raise TypeError(
                f"{cls.__qualname__} declares {cls.code.name}, already {taken.__qualname__}'s"
            )
        _BY_CODE[cls.code] = cls

    def __init__(
        self,
        message: str,
        *,
        reason: str = "",
        field: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.code.name
        self.field = field
        self.metadata: dict[str, str] = dict(metadata or {})

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def to_status(self) -> status_pb2.Status:
        """The rich status the server sends: code, message, ErrorInfo and BadRequest."""
        details: list[any_pb2.Any] = []
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
        )
        packed = any_pb2.Any()
        packed.Pack(info)
        details.append(packed)
        if self.field:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=self.field, description=self.message
                    )
                ]
            )
            packed_bad = any_pb2.Any()
            packed_bad.Pack(bad)
            details.append(packed_bad)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=details)


class InvalidArgument(CwmError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CwmError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CwmError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(CwmError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(CwmError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(CwmError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(CwmError):
    code = grpc.StatusCode.PERMISSION_DENIED


class DataLoss(CwmError):
    code = grpc.StatusCode.DATA_LOSS


class Unavailable(CwmError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(CwmError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(CwmError):
    code = grpc.StatusCode.CANCELLED


class Aborted(CwmError):
    code = grpc.StatusCode.ABORTED


class Internal(CwmError):
    code = grpc.StatusCode.INTERNAL


class Unimplemented(CwmError):
    code = grpc.StatusCode.UNIMPLEMENTED


_CODE_BY_NUMBER: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def error_class(code: grpc.StatusCode) -> type[CwmError]:
    """The exception class for a status code (CwmError itself for UNKNOWN and the rest)."""
    return _BY_CODE.get(code, CwmError)


def _status_from_metadata(
    metadata: Sequence[tuple[str, str | bytes]] | None,
) -> status_pb2.Status | None:
    for key, value in metadata or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


def from_rpc_error(error: grpc.RpcError) -> CwmError:
    """Turn a failed call (sync or asyncio) into its typed exception, keeping the details."""
    code: grpc.StatusCode = error.code()
    trailing: Any = error.trailing_metadata()
    status = _status_from_metadata(trailing)
    if status is None:
        status = status_pb2.Status(code=code.value[0], message=error.details() or "")
    elif not status.message:
        status.message = error.details() or ""
    return from_status(status, code)


def from_status(
    status: status_pb2.Status, fallback: grpc.StatusCode = grpc.StatusCode.UNKNOWN
) -> CwmError:
    """The typed exception a `google.rpc.Status` describes (a failed call's, or a bulk
    connection's result), with its reason, field and metadata."""
    code = _CODE_BY_NUMBER.get(status.code, fallback)
    reason = ""
    field = ""
    meta: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
            meta = dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                field = bad.field_violations[0].field
    cls = error_class(code)
    exc = cls(status.message, reason=reason, field=field, metadata=meta)
    if cls is CwmError:
        exc.code = code
    return exc


__all__ = [
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "CwmError",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "error_class",
    "from_rpc_error",
    "from_status",
]
