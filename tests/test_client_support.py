"""An in-process fake Kiln server for the client and CLI tests (no tests of its own).

`running_fake_server()` starts a real gRPC server on 127.0.0.1 (ephemeral port) with a
scripted `GenerationService` and the standard health service. Each Generate call plays
the next of `service.scripts` (one per call, for calls that must differ), then
`service.script`: response messages are sent, `Abort` ends the call with a rich status
(google.rpc details), `Hang` blocks until the client goes away. Every call's metadata is
recorded.
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2_grpc
from grpc_status import rpc_status

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.proto.kiln.v1 import generation_service_pb2_grpc as pb_grpc


@dataclass
class Abort:
    """End the call with `code`, `message` and google.rpc `details`."""

    code: grpc.StatusCode
    message: str
    details: Sequence[Message] = ()

    def status(self) -> grpc.Status:
        packed = []
        for detail in self.details:
            holder = any_pb2.Any()
            holder.Pack(detail)
            packed.append(holder)
        proto = status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)
        return rpc_status.to_status(proto)


@dataclass
class Hang:
    """Block the call until the client cancels it or its deadline passes."""


Step: TypeAlias = pb.GenerateResponse | Abort | Hang


@dataclass
class FakeGenerationService(pb_grpc.GenerationServiceServicer):
    """Plays `script` for every Generate call and records what it saw."""

    script: list[Step] = field(default_factory=list)
    scripts: list[list[Step]] = field(default_factory=list)
    requests: list[pb.GenerateRequest] = field(default_factory=list)
    # The invocation metadata of every call (Generate and ListModels), in arrival order.
    metadata: list[dict[str, str]] = field(default_factory=list)
    models: pb.ListModelsResponse = field(default_factory=pb.ListModelsResponse)
    list_models_abort: Abort | None = None
    # Set when a call ended before the script did: the client cancelled or its deadline passed.
    client_went_away: threading.Event = field(default_factory=threading.Event)

    def Generate(self, request: pb.GenerateRequest, context: Any) -> Iterator[pb.GenerateResponse]:
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        script = self.scripts.pop(0) if self.scripts else self.script
        ended = threading.Event()
        server_finished = False  # the script ran to its end or aborted: not the client's doing

        def on_termination() -> None:
            ended.set()
            if not server_finished:
                self.client_went_away.set()

        # Runs when the RPC ends for any reason, even if the server never pulls another
        # response from this generator after the client cancelled.
        context.add_callback(on_termination)
        for step in script:
            if isinstance(step, Abort):
                server_finished = True
                context.abort_with_status(step.status())
            elif isinstance(step, Hang):
                ended.wait(timeout=10)
                return
            else:
                yield step
        server_finished = True

    def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        self.metadata.append(dict(context.invocation_metadata()))
        if self.list_models_abort is not None:
            context.abort_with_status(self.list_models_abort.status())
        return self.models


@dataclass
class FakeKiln:
    """A running fake server: its address, scripted service and health servicer."""

    address: str
    service: FakeGenerationService
    health: health.HealthServicer


@contextlib.contextmanager
def running_fake_server(
    credentials: grpc.ServerCredentials | None = None,
) -> Iterator[FakeKiln]:
    """Start the fake server on an ephemeral 127.0.0.1 port (TLS with `credentials`); stop
    it on exit."""
    service = FakeGenerationService()
    health_servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_GenerationServiceServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield FakeKiln(f"127.0.0.1:{port}", service, health_servicer)
    finally:
        server.stop(grace=None).wait(5)


def closed_port_address() -> str:
    """A 127.0.0.1 address nothing listens on (a port just released by the OS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


# Builders for scripted events.


def queued(position: int, request_id: str = "req-1") -> pb.GenerateResponse:
    return pb.GenerateResponse(request_id=request_id, queued=pb.QueuedEvent(position=position))


def started(
    seed: int = 1234,
    steps: int = 2,
    num_outputs: int = 1,
    request_id: str = "req-1",
    mode: str = "",
    strength: float = 0.0,
) -> pb.GenerateResponse:
    """A started event; `mode` "" is what a server that predates image conditioning sends."""
    return pb.GenerateResponse(
        request_id=request_id,
        started=pb.StartedEvent(
            model="tiny",
            width=64,
            height=64,
            num_outputs=num_outputs,
            num_inference_steps=steps,
            guidance_scale=5.0,
            scheduler="K_EULER",
            seed=seed,
            mode=mode,
            strength=strength,
        ),
    )


def progress(
    step: int, total: int = 2, preview: bytes = b"", request_id: str = "req-1"
) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=request_id,
        progress=pb.ProgressEvent(
            step=step,
            total_steps=total,
            preview=preview,
            preview_mime_type="image/jpeg" if preview else "",
            preview_width=32 if preview else 0,
            preview_height=32 if preview else 0,
        ),
    )


def image(
    index: int, seed: int, data: bytes, mime_type: str = "image/png", request_id: str = "req-1"
) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=request_id,
        image=pb.ImageEvent(
            index=index, seed=seed, data=data, mime_type=mime_type, width=64, height=64
        ),
    )


def completed(num_images: int = 1, request_id: str = "req-1") -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=request_id,
        completed=pb.CompletedEvent(
            queue_seconds=0.25,
            inference_seconds=1.5,
            engine_seconds=1.25,
            total_seconds=1.75,
            num_images=num_images,
        ),
    )


def bad_request(*violations: tuple[str, str]) -> Abort:
    """INVALID_ARGUMENT with a google.rpc.BadRequest naming each (field, description)."""
    detail = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=name, description=why)
            for name, why in violations
        ]
    )
    return Abort(grpc.StatusCode.INVALID_ARGUMENT, "invalid request", [detail])


def queue_full(retry_seconds: float) -> Abort:
    """RESOURCE_EXHAUSTED with a google.rpc.RetryInfo asking to wait `retry_seconds`."""
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(retry_seconds * 1e9))
    detail = error_details_pb2.RetryInfo(retry_delay=delay)
    return Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full (64 waiting)", [detail])


def png(width: int = 12, height: int = 8, mode: str = "RGB") -> bytes:
    """A small PNG whose every pixel differs from its neighbours (a gradient)."""
    from PIL import Image

    picture = Image.new("RGB", (width, height))
    pixels = [
        (x * 20 % 256, y * 30 % 256, (x + y) * 7 % 256) for y in range(height) for x in range(width)
    ]
    picture.putdata(pixels)
    buffer = io.BytesIO()
    picture.convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()
