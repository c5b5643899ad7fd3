"""Request bytes that are not a valid message, answered rather than crashed on.

gRPC's generated handlers parse with `FromString`; when that raises, grpc logs a traceback
and ends the call with UNKNOWN. `lenient_parser` returns a MalformedRequest instead, which
the service answers with INVALID_ARGUMENT naming the field when one can be named: a
string field whose bytes are not UTF-8 (a lone surrogate, for one) is found by walking the
wire format against the message's descriptor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

M = TypeVar("M", bound=Message)

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True)
class MalformedRequest:
    """Bytes that do not parse as the expected message: `field` names the offending field
    (a dotted path) when it can be found, else "request"."""

    field: str
    problem: str


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def invalid_string_field(data: bytes, descriptor: Descriptor, prefix: str = "") -> str | None:
    """The dotted path of the first string field in `data` whose bytes are not UTF-8, or
    None (none found, or the bytes are not walkable wire format). An entry of a repeated
    message field is named with its index, e.g. `loras[1].name`."""
    pos = 0
    seen: dict[int, int] = {}
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == _VARINT:
                _, pos = _varint(data, pos)
            elif wire_type == _FIXED64:
                pos += 8
            elif wire_type == _FIXED32:
                pos += 4
            elif wire_type == _LENGTH_DELIMITED:
                length, pos = _varint(data, pos)
                chunk, pos = data[pos : pos + length], pos + length
                field = descriptor.fields_by_number.get(number)
                if field is None:
                    continue
                if field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return prefix + field.name
                elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type:
                    name = field.name
                    if field.is_repeated:
                        index = seen.get(number, 0)
                        seen[number] = index + 1
                        name = f"{name}[{index}]"
                    found = invalid_string_field(chunk, field.message_type, f"{name}.")
                    if found is not None:
                        return prefix + found
            else:
                return None
    except (IndexError, ValueError):
        return None
    return None


def lenient_parser(message_type: type[M]) -> Callable[[bytes], M | MalformedRequest]:
    """A request deserializer for `message_type` that returns MalformedRequest on bytes
    it cannot parse instead of raising."""
    descriptor: Any = message_type.DESCRIPTOR

    def parse(data: bytes) -> M | MalformedRequest:
        try:
            return message_type.FromString(data)
        except DecodeError:
            field = invalid_string_field(data, descriptor)
            if field is not None:
                return MalformedRequest(field, "is not valid UTF-8 (a string field)")
            return MalformedRequest("request", "is not a valid protobuf message")

    return parse


HANDLER_MAKERS = {
    # (request streaming, response streaming) -> grpc's handler constructor
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_lenient_service(server: grpc.aio.Server, service: ServiceDescriptor, servicer: Any) -> None:
    """Serve every method of `service` from `servicer`'s method of the same name, as the
    generated `add_..._to_server` does, but with `lenient_parser` request deserializers:
    unparseable bytes reach the method as a MalformedRequest (to answer with
    INVALID_ARGUMENT) instead of a traceback."""
    handlers = {}
    for method in service.methods:
        make = HANDLER_MAKERS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=lenient_parser(GetMessageClass(method.input_type)),
            response_serializer=GetMessageClass(method.output_type).SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)
