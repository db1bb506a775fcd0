"""Bytes into messages and back: every request is parsed here and every response
serialized here, which is also where each is counted.

- **Requests** are parsed here rather than by gRPC (which then hands over raw bytes), so
  that bytes that are not a valid message (corrupt wire format, a string field with bad
  UTF-8) are the client's INVALID_ARGUMENT; parsed by gRPC they surfaced as UNKNOWN
  (unary) or INTERNAL (Freeze). Parsing is lazy for a request stream and, for a unary
  call, runs only once the caller is authenticated.
- **Responses** are counted as they are serialized: a message's size is then the length of
  the bytes at hand, where sizing it separately (`ByteSize()`, reading `chunk.data`) cost
  as much as serializing it again. A response already in wire format (`wire.PreEncoded`,
  Thaw's chunk parts) goes out as it is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from google.protobuf.message import DecodeError

from cwm_client.errors import InvalidArgument
from cwm_server.manager.metrics import CallMetrics
from cwm_server.manager.windows.wire import PreEncoded

Parse = Callable[[Any], Any]
Serialize = Callable[[Any], bytes]


def request_parser(method: str, deserialize: Callable[[bytes], Any] | None) -> Parse:
    """The method's request deserializer, raising InvalidArgument on bytes that are not a
    valid message (identity when the method takes raw bytes)."""
    if deserialize is None:
        return lambda raw: raw

    def parse(raw: Any) -> Any:
        try:
            return deserialize(raw)
        except DecodeError as exc:
            raise InvalidArgument(
                f"the request to {method} is not a valid message ({exc})",
                reason="MALFORMED_REQUEST",
            ) from None

    return parse


def parse_one(raw: Any, parse: Parse, metrics: CallMetrics | None) -> Any:
    message = parse(raw)
    if metrics is not None:
        metrics.received(message, raw)
    return message


async def parse_stream(
    requests: AsyncIterator[Any], parse: Parse, metrics: CallMetrics | None
) -> AsyncIterator[Any]:
    async for raw in requests:
        message = parse(raw)
        if metrics is not None:
            metrics.received(message, raw)
        yield message


def response_serializer(
    serialize: Serialize | None, metrics: CallMetrics | None
) -> Serialize | None:
    """The method's response serializer, counting each response and passing
    `PreEncoded` ones through."""
    if serialize is None:
        return serialize
    inner = serialize

    def counted(message: Any) -> bytes:
        if type(message) is PreEncoded:
            if metrics is not None:
                metrics.sent_encoded(len(message.wire), message.chunk_bytes, message.first_part)
            return message.wire
        data = inner(message)
        if metrics is not None:
            metrics.sent(message, data)
        return data

    return counted
