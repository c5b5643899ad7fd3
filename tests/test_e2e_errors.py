"""Every way a request can fail, end to end: the status code, its rich details, and a
server that keeps serving afterwards."""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial
from typing import Any

import grpc
import pytest
from e2e_support import (
    RPC_TIMEOUT,
    expect_error,
    field_violations,
    generate,
    images,
    kinds,
    open_stub,
    request,
    status_details,
    wait_for_log,
)
from google.rpc import error_details_pb2

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.proto.kiln.v1 import generation_service_pb2_grpc as pb_grpc

LONG_PROMPT = " ".join(["cat"] * 80)  # 82 tokens with the start and end tokens


@pytest.fixture(scope="module")
def stub(kiln_server: Any) -> Iterator[pb_grpc.GenerationServiceStub]:
    with open_stub(kiln_server.address) as generation_stub:
        yield generation_stub


BAD_FIELDS: dict[str, tuple[dict[str, Any], str]] = {
    "empty prompt": ({"prompt": ""}, "prompt"),
    "prompt over 77 tokens": ({"prompt": LONG_PROMPT}, "prompt"),
    "negative prompt over 77 tokens": ({"negative_prompt": LONG_PROMPT}, "negative_prompt"),
    "width not a multiple of 8": ({"width": 70}, "width"),
    "height not a multiple of 8": ({"height": 33}, "height"),
    "width below the minimum": ({"width": 16}, "width"),
    "height above the maximum": ({"height": 520}, "height"),
    "too many steps": ({"num_inference_steps": 151}, "num_inference_steps"),
    "negative guidance": ({"guidance_scale": -0.5}, "guidance_scale"),
    "NaN guidance": ({"guidance_scale": math.nan}, "guidance_scale"),
    "guidance too large": ({"guidance_scale": 1e6}, "guidance_scale"),
    "too many outputs": ({"num_outputs": 9}, "num_outputs"),
    "unknown scheduler": ({"scheduler": "K_LMS"}, "scheduler"),
    "unknown output format": ({"output_format": 12}, "output_format"),
    "output quality over 100": ({"output_quality": 101}, "output_quality"),
    "unknown priority": ({"priority": 99}, "priority"),
    "unknown preview format": ({"preview": {"format": 7}}, "preview.format"),
    "preview size too small": ({"preview": {"max_size": 4}}, "preview.max_size"),
    "preview size too large": ({"preview": {"max_size": 5000}}, "preview.max_size"),
    "seed overflows with its outputs": ({"seed": 2**64 - 1, "num_outputs": 2}, "seed"),
}


@pytest.mark.parametrize(("fields", "field"), BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
def test_bad_field_is_invalid_argument_naming_it(
    stub: pb_grpc.GenerationServiceStub, fields: dict[str, Any], field: str
) -> None:
    values = {"prompt": "a teapot", "seed": 1, **fields}
    prompt = values.pop("prompt")
    error = expect_error(lambda: generate(stub, request(prompt, **values)))
    violations = field_violations(error)
    assert list(violations) == [field]
    assert violations[field]
    assert field in error.details()  # the plain message names it too
    assert "Traceback" not in error.details()


def test_several_bad_fields_get_one_violation_each(stub: pb_grpc.GenerationServiceStub) -> None:
    message = request(
        "",
        width=12,
        height=4000,
        num_inference_steps=1000,
        guidance_scale=math.inf,
        num_outputs=50,
        scheduler="fastest",
        output_format=9,
        output_quality=500,
        priority=-1,
        preview={"max_size": 2, "format": 3},
    )
    violations = field_violations(expect_error(lambda: generate(stub, message)))
    assert set(violations) == {
        "prompt",
        "width",
        "height",
        "num_inference_steps",
        "guidance_scale",
        "num_outputs",
        "scheduler",
        "output_format",
        "output_quality",
        "priority",
        "preview.max_size",
        "preview.format",
    }


def test_unknown_model_is_not_found(stub: pb_grpc.GenerationServiceStub) -> None:
    error = expect_error(lambda: generate(stub, request(model="stability-ai/sdxl", seed=1)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "stability-ai/sdxl" in error.details()


def test_server_keeps_serving_after_bad_requests(stub: pb_grpc.GenerationServiceStub) -> None:
    for fields, _ in BAD_FIELDS.values():
        values = {"prompt": "a teapot", **fields}
        prompt = values.pop("prompt")
        expect_error(partial(generate, stub, request(prompt, **values)))
    expect_error(lambda: generate(stub, request(model="nope")))
    events = generate(stub, request(seed=4, num_outputs=2))
    assert kinds(events)[-1] == "completed"
    assert len(images(events)) == 2


def request_id_of(events: list[pb.GenerateResponse]) -> str:
    assert events, "no event arrived"
    return events[0].request_id


def test_client_cancel_drops_the_job(kiln_server: Any, stub: pb_grpc.GenerationServiceStub) -> None:
    call = stub.Generate(
        request(seed=8, width=512, height=512, num_inference_steps=150), timeout=RPC_TIMEOUT
    )
    received = []
    for event in call:
        received.append(event)
        if event.WhichOneof("event") == "progress":
            call.cancel()
            break
    request_id = request_id_of(received)
    # The API layer saw the stream end early, and the engine dropped the job between steps.
    wait_for_log(
        kiln_server.logs,
        lambda r: r.get("request_id") == request_id and "dropped" in r["message"],
    )
    wait_for_log(
        kiln_server.logs,
        lambda r: r.get("request_id") == request_id and r["message"] == "request cancelled",
    )
    events = generate(stub, request(seed=8, num_inference_steps=4))
    assert kinds(events)[-1] == "completed"


def test_deadline_exceeded_mid_generation(
    kiln_server: Any, stub: pb_grpc.GenerationServiceStub
) -> None:
    # 150 steps at 512x512 take far longer than the deadline even on a fast CPU.
    call = stub.Generate(
        request(seed=8, width=512, height=512, num_inference_steps=150), timeout=1.5
    )
    received = []
    with pytest.raises(grpc.RpcError) as raised:
        for event in call:
            received.append(event)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "progress" in kinds(received), "the deadline passed before generation began"
    assert "image" not in kinds(received)
    request_id = request_id_of(received)
    wait_for_log(
        kiln_server.logs,
        lambda r: r.get("request_id") == request_id and r["message"] == "request cancelled",
    )
    events = generate(stub, request(seed=8, num_inference_steps=4))
    assert kinds(events)[-1] == "completed"


def test_full_queue_is_resource_exhausted_with_retry_info(server_factory: Any) -> None:
    """With one guided job per batch and one waiting slot, the third request is refused."""
    server = server_factory("--backend", "torch", "--max-queue", "1", "--max-batch-rows", "2")
    long_job = request(seed=1, width=512, height=512, num_inference_steps=150)
    with open_stub(server.address) as stub:
        running = stub.Generate(long_job, timeout=RPC_TIMEOUT)
        waiting = None
        try:
            # The second request is sent only once the first left the queue, so the first
            # is not refused for a slot the second took.
            assert [next(running).WhichOneof("event") for _ in range(2)] == ["queued", "started"]
            waiting = stub.Generate(long_job, timeout=RPC_TIMEOUT)
            first = next(waiting)
            assert first.WhichOneof("event") == "queued" and first.queued.position == 0

            error = expect_error(lambda: generate(stub, long_job))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            (retry,) = status_details(error, error_details_pb2.RetryInfo)
            delay = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
            assert delay > 0
            # Refused at once: the running request had not even finished its steps.
            assert running.is_active()
        finally:
            running.cancel()
            if waiting is not None:
                waiting.cancel()
        # Cancelling frees the slots: the server takes work again.
        events = generate(stub, request(seed=2, num_inference_steps=2))
        assert kinds(events)[-1] == "completed"


def raw_generate(kiln_server: Any, data: bytes) -> grpc.RpcError:
    """Send `data` as the Generate request's bytes, unparsed; the call's error."""
    with grpc.insecure_channel(kiln_server.address) as channel:
        call = channel.unary_stream(
            "/kiln.v1.GenerationService/Generate",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.GenerateResponse.FromString,
        )
        return expect_error(lambda: list(call(data, timeout=RPC_TIMEOUT)))


MALFORMED = {
    "truncated varint": (b"\x08\xff\xff", "request"),
    "length past the end": (b"\x12\x50abc", "request"),
    "invalid UTF-8 in prompt": (b"\x12\x03a\xff\xfe", "prompt"),
    "lone surrogate (CESU-8) in scheduler": (b"\x12\x01a\x4a\x03\xed\xa0\x80", "scheduler"),
}


@pytest.mark.parametrize(("data", "field"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_bytes_are_invalid_argument(kiln_server: Any, data: bytes, field: str) -> None:
    error = raw_generate(kiln_server, data)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(error)) == [field]
    assert "Traceback" not in error.details()


def test_malformed_bytes_log_one_warning_line(kiln_server: Any) -> None:
    before = len(kiln_server.logs().splitlines())
    raw_generate(kiln_server, b"\x08\xff\xff")
    record = wait_for_log(
        kiln_server.logs, lambda r: "refused a malformed request" in r.get("message", "")
    )
    assert record["level"] == "warning" and "exception" not in record
    new_lines = kiln_server.logs().splitlines()[before:]
    assert not any("Traceback" in line or "DecodeError" in line for line in new_lines)
