"""Server lifecycle end to end: health through start-up and drain, reflection, SIGTERM."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import grpc
from e2e_support import (
    RPC_TIMEOUT,
    expect_error,
    generate,
    images,
    kinds,
    of_kind,
    open_stub,
    request,
    wait_for_log,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SERVICE = "kiln.v1.GenerationService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
START_TIMEOUT = 180.0


def health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
        return int(reply.status)


def test_reflection_lists_the_generation_service(kiln_server: Any) -> None:
    with grpc.insecure_channel(kiln_server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = database.get_services()
        assert SERVICE in services
        assert "grpc.health.v1.Health" in services
        # A reflection-driven client (grpcurl, Postman) can discover the whole contract.
        descriptor = database.FindFileContainingSymbol(SERVICE)
        (service,) = [s for s in descriptor.service if s.name == "GenerationService"]
        methods = {method.name: method for method in service.method}
        assert set(methods) == {"Generate", "ListModels"}
        assert methods["Generate"].server_streaming
        assert not methods["ListModels"].server_streaming


def test_health_is_serving_for_the_server_and_the_service(kiln_server: Any) -> None:
    assert health(kiln_server.address) == SERVING
    assert health(kiln_server.address, SERVICE) == SERVING


@contextmanager
def watch_health(address: str, service: str = "") -> Iterator[Iterator[int]]:
    """grpc.health.v1 Watch: the current status, then every change, as they happen."""
    with grpc.insecure_channel(address) as channel:
        replies = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=START_TIMEOUT
        )
        yield (int(reply.status) for reply in replies)


def test_health_through_start_up_and_shutdown(server_factory: Any) -> None:
    """NOT_SERVING as soon as the port opens, SERVING once warmed up, NOT_SERVING on drain.

    The status only ever moves forwards: never SERVING -> NOT_SERVING before shutdown.
    """
    server = server_factory("--backend", "torch", wait_serving=False)
    observed: list[int] = []
    start_up_answer = None
    with watch_health(server.address) as statuses:
        for status in statuses:
            observed.append(status)
            if status == SERVING:
                break
            if start_up_answer is None:
                # Generating before the models are ready is refused cleanly (or, if
                # loading finished meanwhile, simply served): never an internal error.
                with open_stub(server.address) as stub:
                    try:
                        generate(stub, request(seed=1, num_inference_steps=1))
                        start_up_answer = "served"
                    except grpc.RpcError as error:
                        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                        start_up_answer = "unavailable"
        # On a fast machine the models may be warm before the first look; otherwise the
        # port must have said NOT_SERVING until then.
        assert observed[-1] == SERVING, f"{observed}\n{server.logs()}"
        assert set(observed[:-1]) <= {NOT_SERVING}
        assert health(server.address, SERVICE) == SERVING
        with open_stub(server.address) as stub:
            assert kinds(generate(stub, request(seed=1)))[-1] == "completed"

        server.process.send_signal(signal.SIGTERM)
        assert next(statuses) == NOT_SERVING
    assert server.process.wait(timeout=START_TIMEOUT) == 0


def test_sigterm_drains_in_flight_work_then_exits_zero(server_factory: Any) -> None:
    server = server_factory("--backend", "torch")
    with (
        ThreadPoolExecutor(1) as pool,
        open_stub(server.address) as stub,
        watch_health(server.address, SERVICE) as statuses,
    ):
        assert next(statuses) == SERVING
        # Long enough (150 steps) that the drain is still under way while we probe it.
        call = stub.Generate(
            request(seed=9, num_outputs=2, num_inference_steps=150), timeout=RPC_TIMEOUT
        )
        received = []
        for event in call:
            received.append(event)
            if event.WhichOneof("event") == "progress":
                break
        rest = pool.submit(list, call)  # keep reading the in-flight stream meanwhile

        server.process.send_signal(signal.SIGTERM)
        assert next(statuses) == NOT_SERVING
        assert health(server.address) == NOT_SERVING
        refused = expect_error(lambda: generate(stub, request(seed=2, num_inference_steps=2)))
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
        assert not rest.done(), "the in-flight request ended before the drain was probed"

        events = received + rest.result(timeout=RPC_TIMEOUT)
    sequence = kinds(events)
    assert sequence[-3:] == ["image", "image", "completed"]
    assert [p.step for p in of_kind(events, "progress")] == list(range(1, 151))
    assert [image.seed for image in images(events)] == [9, 10]
    assert server.process.wait(timeout=START_TIMEOUT) == 0
    wait_for_log(server.logs, lambda record: record["message"] == "draining")
    wait_for_log(server.logs, lambda record: record["message"] == "stopped")


def test_json_logs_hold_only_json(kiln_server: Any) -> None:
    """Every line the server and its engine core wrote (model loading by transformers and
    diffusers included, after a generation and a bad request) is one JSON object."""
    from e2e_support import generate, open_stub, request

    with open_stub(kiln_server.address) as stub:
        generate(stub, request("a teapot", seed=1, num_inference_steps=2))
    lines = [line for line in kiln_server.logs().splitlines() if line.strip()]
    assert lines
    for line in lines:
        assert isinstance(json.loads(line), dict), line
