"""Helpers for the end-to-end tests: raw gRPC stubs, event plumbing, rich error details.

The end-to-end tests speak the wire contract through the generated stubs (what any
language's client would do), not through kiln_client, so they pin the protocol itself.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.proto.kiln.v1 import generation_service_pb2_grpc as pb_grpc

MESSAGE_LIMIT = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
]
RPC_TIMEOUT = 120.0  # bounds a hung call; a passing test never comes near it


@contextmanager
def open_stub(address: str) -> Iterator[pb_grpc.GenerationServiceStub]:
    """A GenerationService stub on its own channel, closed afterwards."""
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


def request(prompt: str = "a teapot on marble", **fields: Any) -> pb.GenerateRequest:
    """A GenerateRequest; `preview` may be given as a dict of PreviewOptions fields."""
    preview = fields.pop("preview", None)
    message = pb.GenerateRequest(prompt=prompt, **fields)
    if preview is not None:
        message.preview.CopyFrom(pb.PreviewOptions(**preview))
    return message


def generate(
    stub: pb_grpc.GenerationServiceStub, message: pb.GenerateRequest, timeout: float = RPC_TIMEOUT
) -> list[pb.GenerateResponse]:
    """Every event of one successful Generate stream."""
    return list(stub.Generate(message, timeout=timeout))


def kinds(events: list[pb.GenerateResponse]) -> list[str]:
    """The oneof member of each event: queued, started, progress, image, completed."""
    return [str(event.WhichOneof("event")) for event in events]


def of_kind(events: list[pb.GenerateResponse], kind: str) -> list[Any]:
    """The payloads of every event of one kind, in order."""
    return [getattr(event, kind) for event in events if event.WhichOneof("event") == kind]


def images(events: list[pb.GenerateResponse]) -> list[pb.ImageEvent]:
    """Image events in index order."""
    return sorted(of_kind(events, "image"), key=lambda image: image.index)


def decode(data: bytes) -> Image.Image:
    """Decode encoded image bytes fully (a truncated file fails here)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def png_parameters(data: bytes) -> dict[str, Any]:
    """The generation parameters a PNG carries in its "parameters" text chunk."""
    image = decode(data)
    assert image.format == "PNG"
    text = image.info["parameters"]
    parsed: dict[str, Any] = json.loads(text)
    return parsed


def expect_error(
    call: Callable[[], object],
) -> grpc.RpcError:
    """Run `call` and return the RpcError it must raise."""
    try:
        call()
    except grpc.RpcError as error:
        return error
    raise AssertionError("the call succeeded; an error status was expected")


def status_details(error: grpc.RpcError, detail_type: type[Message]) -> list[Any]:
    """Every google.rpc detail of `detail_type` in the error's rich status."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no google.rpc.Status in trailers of {error}"
    assert status.code == error.code().value[0]
    found = []
    for packed in status.details:
        if packed.Is(detail_type.DESCRIPTOR):
            detail = detail_type()
            packed.Unpack(detail)
            found.append(detail)
    return found


def field_violations(error: grpc.RpcError) -> dict[str, str]:
    """field -> description of the BadRequest carried by an INVALID_ARGUMENT error."""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    (bad_request,) = status_details(error, error_details_pb2.BadRequest)
    fields = [v.field for v in bad_request.field_violations]
    assert len(fields) == len(set(fields)), f"a field is reported twice: {fields}"
    return {v.field: v.description for v in bad_request.field_violations}


def log_records(log_text: str) -> list[dict[str, Any]]:
    """The server's JSON log lines (other output, such as library warnings, skipped)."""
    records = []
    for line in log_text.splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def wait_for_log(
    read_logs: Callable[[], str],
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Poll the server's log until a record satisfies `predicate`; return that record."""
    deadline = time.monotonic() + timeout
    while True:
        for record in log_records(read_logs()):
            if predicate(record):
                return record
        if time.monotonic() > deadline:
            raise AssertionError(f"no matching log record within {timeout} s:\n{read_logs()}")
        time.sleep(0.05)
