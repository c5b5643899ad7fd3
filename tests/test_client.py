"""The typed clients (sync and asyncio) against an in-process fake Kiln server."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from test_client_support import (
    Abort,
    FakeKiln,
    Hang,
    bad_request,
    closed_port_address,
    completed,
    image,
    progress,
    queue_full,
    queued,
    running_fake_server,
    started,
)

from kiln_client.aio import AsyncKilnClient
from kiln_client.client import KilnClient
from kiln_client.errors import (
    DeadlineExceeded,
    InvalidArgument,
    KilnError,
    ModelNotFound,
    PermissionDenied,
    QueueFull,
    ResourceExhausted,
    ServerUnreachable,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)
from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.requests import build_request
from kiln_client.results import GeneratedImage

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE = "kiln.v1.GenerationService"


@pytest.fixture
def kiln() -> Iterator[FakeKiln]:
    with running_fake_server() as fake:
        yield fake


def full_script() -> list[pb.GenerateResponse]:
    """Two outputs whose image events arrive out of index order."""
    return [
        queued(1),
        queued(0),
        started(seed=1234, num_outputs=2),
        progress(1),
        progress(2),
        image(1, 1235, b"second"),
        image(0, 1234, b"first"),
        completed(num_images=2),
    ]


# build_request


def test_build_request_maps_names_and_leaves_defaults_absent() -> None:
    request = build_request(
        "a teapot",
        width=768,
        output_format="WebP",
        priority="high",
        preview_every=2,
        preview_format="webp",
    )
    assert request.prompt == "a teapot"
    assert request.width == 768
    assert request.output_format == pb.OUTPUT_FORMAT_WEBP
    assert request.priority == pb.PRIORITY_HIGH
    assert request.preview.every_n_steps == 2
    assert request.preview.format == pb.PREVIEW_FORMAT_WEBP
    assert not request.HasField("seed")
    assert not request.HasField("guidance_scale")

    explicit = build_request("x", seed=0, guidance_scale=1.0, output_format=pb.OUTPUT_FORMAT_JPEG)
    assert explicit.HasField("seed") and explicit.seed == 0
    assert explicit.HasField("guidance_scale") and explicit.guidance_scale == 1.0
    assert explicit.output_format == pb.OUTPUT_FORMAT_JPEG
    assert not explicit.HasField("preview")


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"output_format": "gif"}, "output_format"),
        ({"preview_format": "png"}, "preview_format"),
        ({"priority": "urgent"}, "priority"),
        ({"width": -8}, "width"),
        ({"seed": -1}, "seed"),
        ({"output_format": 99}, "output_format"),
    ],
)
def test_build_request_rejects_unrepresentable_values(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        build_request("x", **kwargs)


# sync client


def test_generate_events_arrive_in_server_order(kiln: FakeKiln) -> None:
    kiln.service.script = list(full_script())
    request = build_request("a teapot", seed=1234, num_outputs=2)
    with KilnClient(kiln.address) as client:
        events = list(client.generate_events(request))
    assert events == full_script()
    assert kiln.service.requests == [request]


def test_generate_collects_images_timings_and_settings(kiln: FakeKiln) -> None:
    kiln.service.script = full_script()
    seen: list[str | None] = []
    with KilnClient(kiln.address) as client:
        result = client.generate(
            "a teapot",
            seed=1234,
            num_outputs=2,
            on_event=lambda e: seen.append(e.WhichOneof("event")),
        )
    assert result.request_id == "req-1"
    assert [(i.index, i.seed, i.data) for i in result.images] == [
        (0, 1234, b"first"),
        (1, 1235, b"second"),
    ]
    assert result.images[0].mime_type == "image/png"
    assert result.timings.queue_seconds == 0.25
    assert result.timings.total_seconds == 1.75
    assert result.started is not None and result.started.scheduler == "K_EULER"
    assert seen == [e.WhichOneof("event") for e in full_script()]
    sent = kiln.service.requests[0]
    assert sent.seed == 1234 and sent.num_outputs == 2 and sent.prompt == "a teapot"


def test_generate_takes_a_prebuilt_request_but_not_both(kiln: FakeKiln) -> None:
    kiln.service.script = [image(0, 5, b"x"), completed()]
    request = build_request("a teapot", seed=5)
    with KilnClient(kiln.address) as client:
        assert client.generate(request=request).images[0].seed == 5
        with pytest.raises(TypeError):
            client.generate("other", request=request)
    assert kiln.service.requests == [request]


def test_stream_ending_without_completed_is_an_error(kiln: FakeKiln) -> None:
    kiln.service.script = [started(), image(0, 1, b"x")]
    with KilnClient(kiln.address) as client, pytest.raises(KilnError, match="completed"):
        client.generate("a teapot")


def test_invalid_argument_carries_field_violations(kiln: FakeKiln) -> None:
    kiln.service.script = [
        bad_request(("width", "must be a multiple of 8"), ("prompt", "must not be empty"))
    ]
    with KilnClient(kiln.address) as client, pytest.raises(InvalidArgument) as caught:
        client.generate("", width=63)
    err = caught.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.message == "invalid request"
    assert err.field_violations == [
        ("width", "must be a multiple of 8"),
        ("prompt", "must not be empty"),
    ]
    assert err.retry_after is None
    assert "width: must be a multiple of 8" in str(err)


def test_queue_full_carries_retry_after(kiln: FakeKiln) -> None:
    kiln.service.script = [queued(3), queue_full(2.5)]
    with KilnClient(kiln.address) as client, pytest.raises(QueueFull) as caught:
        client.generate("a teapot")
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.retry_after == pytest.approx(2.5)


@pytest.mark.parametrize(
    ("code", "error_class"),
    [
        (grpc.StatusCode.NOT_FOUND, ModelNotFound),
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
        (grpc.StatusCode.INTERNAL, KilnError),
        (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
    ],
)
def test_status_codes_map_to_error_classes(
    kiln: FakeKiln, code: grpc.StatusCode, error_class: type[KilnError]
) -> None:
    kiln.service.list_models_abort = Abort(code, "nope")
    with KilnClient(kiln.address) as client, pytest.raises(error_class) as caught:
        client.list_models()
    assert type(caught.value) is error_class
    assert (caught.value.code, caught.value.message) == (code, "nope")


def test_deadline_becomes_deadline_exceeded(kiln: FakeKiln) -> None:
    kiln.service.script = [queued(0), Hang()]
    with KilnClient(kiln.address, timeout=0.3) as client, pytest.raises(DeadlineExceeded):
        client.generate("a teapot")
    assert kiln.service.client_went_away.wait(5)


def test_breaking_out_of_events_cancels_the_call(kiln: FakeKiln) -> None:
    kiln.service.script = [queued(0), Hang()]
    with KilnClient(kiln.address) as client:
        for event in client.generate_events(build_request("a teapot")):
            assert event.WhichOneof("event") == "queued"
            break
        assert kiln.service.client_went_away.wait(5)


def test_unreachable_server_is_reported_as_such() -> None:
    address = closed_port_address()
    with KilnClient(address, timeout=5) as client, pytest.raises(ServerUnreachable):
        client.list_models()


def test_list_models_returns_the_servers_answer(kiln: FakeKiln) -> None:
    kiln.service.models = pb.ListModelsResponse(
        default_model="tiny", models=[pb.ModelInfo(name="tiny", default_width=64)]
    )
    with KilnClient(kiln.address) as client:
        assert client.list_models() == kiln.service.models


def test_wait_until_ready_follows_the_health_service(kiln: FakeKiln) -> None:
    kiln.health.set(SERVICE, NOT_SERVING)
    with KilnClient(kiln.address) as client:
        with pytest.raises(DeadlineExceeded, match="NOT_SERVING"):
            client.wait_until_ready(timeout=0.3)

        outcome: list[BaseException | None] = []

        def wait() -> None:
            try:
                client.wait_until_ready(timeout=10)
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        waiter = threading.Thread(target=wait)
        waiter.start()
        kiln.health.set(SERVICE, SERVING)
        waiter.join(10)
        assert outcome == [None]


def test_wait_until_ready_falls_back_to_the_server_wide_status(kiln: FakeKiln) -> None:
    # SERVICE is not registered: the "" entry decides.
    kiln.health.set("", NOT_SERVING)
    with KilnClient(kiln.address) as client:
        with pytest.raises(DeadlineExceeded):
            client.wait_until_ready(timeout=0.3)
        kiln.health.set("", SERVING)
        client.wait_until_ready(timeout=5)


def test_from_rpc_error_tolerates_errors_without_status() -> None:
    err = from_rpc_error(grpc.RpcError("odd"))
    assert err.code == grpc.StatusCode.UNKNOWN
    assert err.field_violations == []


def test_generated_image_save_writes_the_bytes(tmp_path: Path) -> None:
    picture = GeneratedImage(0, 9, b"\x89PNG...", "image/webp", 64, 64)
    path = picture.save(tmp_path / "sub" / "out.webp")
    assert path.read_bytes() == b"\x89PNG..."
    assert picture.extension == ".webp"


# asyncio client


async def test_async_generate_collects_result_and_awaits_callbacks(kiln: FakeKiln) -> None:
    kiln.service.script = full_script()
    seen: list[str | None] = []

    async def on_event(event: pb.GenerateResponse) -> None:
        seen.append(event.WhichOneof("event"))

    async with AsyncKilnClient(kiln.address) as client:
        result = await client.generate("a teapot", seed=1234, on_event=on_event)
    assert [image.seed for image in result.images] == [1234, 1235]
    assert result.timings.inference_seconds == 1.5
    assert seen == [e.WhichOneof("event") for e in full_script()]


async def test_async_events_and_errors(kiln: FakeKiln) -> None:
    kiln.service.script = [queued(2), bad_request(("height", "too large"))]
    kinds: list[str | None] = []
    async with AsyncKilnClient(kiln.address) as client:
        with pytest.raises(InvalidArgument) as caught:
            async for event in client.generate_events(build_request("a teapot")):
                kinds.append(event.WhichOneof("event"))
    assert kinds == ["queued"]
    assert caught.value.field_violations == [("height", "too large")]


async def test_async_list_models_and_deadline(kiln: FakeKiln) -> None:
    kiln.service.models = pb.ListModelsResponse(default_model="tiny")
    kiln.service.script = [Hang()]
    async with AsyncKilnClient(kiln.address, timeout=0.3) as client:
        assert (await client.list_models()).default_model == "tiny"
        with pytest.raises(DeadlineExceeded):
            await client.generate("a teapot")


async def test_cancelling_the_consumer_cancels_the_server_call(kiln: FakeKiln) -> None:
    kiln.service.script = [queued(0), Hang()]
    first_event = asyncio.Event()

    async def consume(client: AsyncKilnClient) -> None:
        async for _ in client.generate_events(build_request("a teapot")):
            first_event.set()

    async with AsyncKilnClient(kiln.address) as client:
        task = asyncio.create_task(consume(client))
        await asyncio.wait_for(first_event.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.to_thread(kiln.service.client_went_away.wait, 5)


async def test_async_wait_until_ready(kiln: FakeKiln) -> None:
    kiln.health.set(SERVICE, NOT_SERVING)
    async with AsyncKilnClient(kiln.address) as client:
        with pytest.raises(DeadlineExceeded):
            await client.wait_until_ready(timeout=0.3)
        kiln.health.set(SERVICE, SERVING)
        await client.wait_until_ready(timeout=5)
