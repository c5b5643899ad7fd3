"""End-to-end generation against a real `kiln serve` (tiny model: 64x64, 8 steps default)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from e2e_support import (
    decode,
    generate,
    images,
    kinds,
    of_kind,
    open_stub,
    png_parameters,
    request,
)

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.proto.kiln.v1 import generation_service_pb2_grpc as pb_grpc
from kiln_server.pipeline.schedulers import scheduler_names

DEFAULT_STEPS = 8  # the `tiny` entry of conftest's config


@pytest.fixture(scope="module")
def stub(kiln_server: Any) -> Iterator[pb_grpc.GenerationServiceStub]:
    with open_stub(kiln_server.address) as generation_stub:
        yield generation_stub


def test_events_arrive_in_order_with_consistent_timings(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    # num_inference_steps 0 (the proto default) means the model's default number of steps.
    message = request(seed=42, num_outputs=2, num_inference_steps=0, preview={"every_n_steps": 2})
    events = generate(stub, message)
    sequence = kinds(events)
    # queued (repeated as the position moves) -> started -> progress... -> images -> completed
    first_started = sequence.index("started")
    assert first_started >= 1 and set(sequence[:first_started]) == {"queued"}
    assert sequence[first_started:] == (
        ["started"] + ["progress"] * DEFAULT_STEPS + ["image"] * 2 + ["completed"]
    )
    assert of_kind(events, "queued")[-1].position == 0
    request_ids = {event.request_id for event in events}
    assert len(request_ids) == 1 and request_ids != {""}

    (started,) = of_kind(events, "started")
    assert (started.model, started.width, started.height) == ("tiny", 64, 64)
    assert (started.num_outputs, started.num_inference_steps) == (2, DEFAULT_STEPS)
    assert (started.scheduler, started.seed) == ("K_EULER", 42)
    assert started.guidance_scale == pytest.approx(7.5)

    progress = of_kind(events, "progress")
    assert [p.step for p in progress] == list(range(1, DEFAULT_STEPS + 1))
    assert {p.total_steps for p in progress} == {DEFAULT_STEPS}

    assert [image.index for image in of_kind(events, "image")] == [0, 1]

    (completed,) = of_kind(events, "completed")
    assert completed.num_images == 2
    for seconds in ("queue_seconds", "inference_seconds", "engine_seconds", "total_seconds"):
        assert getattr(completed, seconds) >= 0, seconds
    assert completed.engine_seconds <= completed.total_seconds
    assert completed.queue_seconds <= completed.total_seconds


def test_progress_total_counts_every_unet_evaluation(stub: pb_grpc.GenerationServiceStub) -> None:
    """Heun evaluates the UNet about twice per step; progress counts what actually runs."""
    events = generate(stub, request(seed=1, scheduler="HeunDiscrete", num_inference_steps=4))
    progress = of_kind(events, "progress")
    total = progress[0].total_steps
    assert total > 4
    assert [p.step for p in progress] == list(range(1, total + 1))
    assert kinds(events)[-1] == "completed"


@pytest.mark.parametrize(
    ("preview_format", "mime", "pil_format"),
    [
        (pb.PREVIEW_FORMAT_UNSPECIFIED, "image/jpeg", "JPEG"),
        (pb.PREVIEW_FORMAT_WEBP, "image/webp", "WEBP"),
    ],
)
def test_previews_decode_fit_and_follow_the_cadence(
    stub: pb_grpc.GenerationServiceStub, preview_format: int, mime: str, pil_format: str
) -> None:
    every, max_size = 3, 40
    events = generate(
        stub,
        request(
            seed=7,
            num_outputs=2,
            width=96,
            height=64,
            preview={"every_n_steps": every, "max_size": max_size, "format": preview_format},
        ),
    )
    progress = of_kind(events, "progress")
    with_preview = [p.step for p in progress if p.preview]
    for p in progress:
        due = p.step % every == 0
        final = p.step == p.total_steps
        assert bool(p.preview) == due or final, f"step {p.step}: preview {bool(p.preview)}"
    assert {3, 6} <= set(with_preview)
    for p in progress:
        if not p.preview:
            continue
        preview = decode(p.preview)
        assert preview.format == pil_format and p.preview_mime_type == mime
        assert preview.size == (p.preview_width, p.preview_height)
        assert max(preview.size) <= max_size
        assert preview.width > preview.height  # two 96x64 outputs side by side


def test_no_previews_unless_asked(stub: pb_grpc.GenerationServiceStub) -> None:
    events = generate(stub, request(seed=7))
    progress = of_kind(events, "progress")
    assert len(progress) == DEFAULT_STEPS
    assert not any(p.preview or p.preview_mime_type for p in progress)


@pytest.mark.parametrize(
    ("output_format", "mime", "pil_format", "width", "height"),
    [
        (pb.OUTPUT_FORMAT_UNSPECIFIED, "image/png", "PNG", 64, 64),
        (pb.OUTPUT_FORMAT_PNG, "image/png", "PNG", 96, 48),
        (pb.OUTPUT_FORMAT_JPEG, "image/jpeg", "JPEG", 48, 80),
        (pb.OUTPUT_FORMAT_WEBP, "image/webp", "WEBP", 128, 32),
    ],
)
def test_images_have_the_requested_format_and_size(
    stub: pb_grpc.GenerationServiceStub,
    output_format: int,
    mime: str,
    pil_format: str,
    width: int,
    height: int,
) -> None:
    events = generate(
        stub,
        request(
            seed=3,
            width=width,
            height=height,
            output_format=output_format,
            output_quality=80,
            num_inference_steps=3,
        ),
    )
    (image,) = images(events)
    assert image.mime_type == mime
    assert (image.width, image.height) == (width, height)
    decoded = decode(image.data)
    assert decoded.format == pil_format
    assert decoded.size == (width, height)
    assert decoded.mode == "RGB"


def test_output_quality_changes_lossy_encodings(stub: pb_grpc.GenerationServiceStub) -> None:
    def jpeg(quality: int) -> bytes:
        message = request(seed=3, output_format=pb.OUTPUT_FORMAT_JPEG, output_quality=quality)
        return bytes(images(generate(stub, message))[0].data)

    assert len(jpeg(20)) < len(jpeg(100))


def test_each_image_reports_its_seed_everywhere(stub: pb_grpc.GenerationServiceStub) -> None:
    events = generate(
        stub, request("a lighthouse", negative_prompt="fog", seed=1000, num_outputs=3)
    )
    outputs = images(events)
    assert [image.index for image in outputs] == [0, 1, 2]
    assert [image.seed for image in outputs] == [1000, 1001, 1002]
    for image in outputs:
        parameters = png_parameters(image.data)
        assert parameters["seed"] == image.seed
        assert parameters["prompt"] == "a lighthouse"
        assert parameters["negative_prompt"] == "fog"
        assert (parameters["width"], parameters["height"]) == (64, 64)
        assert parameters["num_inference_steps"] == DEFAULT_STEPS
        assert parameters["scheduler"] == "K_EULER"


def test_image_i_is_reproducible_alone_from_its_seed(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """Image i of seed s is image 0 of seed s + i.

    Within one uint8 level rather than bit for bit: three outputs run as a bigger UNet
    batch than one, and on CPU the batch size can change the kernels' summation order
    (measured: one channel of one pixel off by one level, with 2 torch threads).
    """
    together = images(generate(stub, request(seed=500, num_outputs=3)))
    alone = images(generate(stub, request(seed=502)))[0]
    assert alone.seed == together[2].seed == 502
    difference = np.abs(
        np.asarray(decode(alone.data), dtype=np.int16)
        - np.asarray(decode(together[2].data), dtype=np.int16)
    )
    assert difference.max() <= 1
    assert together[0].data != together[1].data


def test_absent_seed_is_random_reported_and_reproducible(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    first = generate(stub, request(num_outputs=2))
    second = generate(stub, request(num_outputs=2))
    seed = of_kind(first, "started")[0].seed
    assert [image.seed for image in images(first)] == [seed, seed + 1]
    assert seed != of_kind(second, "started")[0].seed
    replay = generate(stub, request(num_outputs=2, seed=seed))
    assert [image.data for image in images(replay)] == [image.data for image in images(first)]


def test_largest_seeds_round_trip(stub: pb_grpc.GenerationServiceStub) -> None:
    """Seeds use the whole uint64 range, through the proto and the PNG text chunk."""
    top = 2**64 - 1
    events = generate(stub, request(seed=top - 1, num_outputs=2, num_inference_steps=2))
    assert of_kind(events, "started")[0].seed == top - 1
    assert [image.seed for image in images(events)] == [top - 1, top]
    assert [png_parameters(image.data)["seed"] for image in images(events)] == [top - 1, top]


@pytest.mark.parametrize("scheduler", ["K_EULER", "K_EULER_ANCESTRAL"])
def test_same_request_gives_byte_identical_pngs(
    stub: pb_grpc.GenerationServiceStub, scheduler: str
) -> None:
    message = request(seed=77, num_outputs=2, scheduler=scheduler, negative_prompt="blurry")
    first = [image.data for image in images(generate(stub, message))]
    second = [image.data for image in images(generate(stub, message))]
    assert len(first) == 2 and first == second
    assert first[0] != first[1]


def test_same_request_on_another_server_gives_byte_identical_pngs(
    stub: pb_grpc.GenerationServiceStub, server_factory: Any
) -> None:
    message = request(seed=2024, num_outputs=2, width=80, height=48, scheduler="DPMSolverMultistep")
    here = [image.data for image in images(generate(stub, message))]
    other = server_factory("--backend", "torch")
    with open_stub(other.address) as other_stub:
        there = [image.data for image in images(generate(other_stub, message))]
    assert here == there


def test_list_models_reports_defaults_and_limits(stub: pb_grpc.GenerationServiceStub) -> None:
    reply = stub.ListModels(pb.ListModelsRequest(), timeout=30)
    assert reply.default_model == "tiny"
    (model,) = reply.models
    assert (model.name, model.family, model.backend) == ("tiny", "sdxl", "torch")
    assert (model.default_width, model.default_height) == (64, 64)
    assert model.default_num_inference_steps == DEFAULT_STEPS
    assert model.default_guidance_scale == pytest.approx(7.5)
    assert model.default_scheduler == "K_EULER"
    assert (model.min_size, model.max_size) == (32, 512)
    assert model.max_num_inference_steps == 150
    assert model.max_num_outputs == 8
    assert model.max_guidance_scale == pytest.approx(50)
    assert model.max_prompt_tokens == 77
    assert list(model.schedulers) == scheduler_names()
    assert {"DDIM", "DPMSolverMultistep", "HeunDiscrete", "KarrasDPM", "K_EULER_ANCESTRAL",
            "K_EULER", "PNDM"} <= set(model.schedulers)  # fmt: skip


def test_every_listed_scheduler_generates(stub: pb_grpc.GenerationServiceStub) -> None:
    listed = stub.ListModels(pb.ListModelsRequest(), timeout=30).models[0].schedulers
    for scheduler in listed:
        events = generate(stub, request(seed=5, scheduler=scheduler, num_inference_steps=2))
        assert of_kind(events, "started")[0].scheduler == scheduler
        assert len(images(events)) == 1, scheduler
