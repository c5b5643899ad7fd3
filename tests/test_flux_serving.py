"""FLUX models served beside SDXL by one `kiln serve`: ListModels, generation equal to the
pipeline run alone, both families at once, and the family's own refusals.

The server serves the tiny SDXL model and the tiny FLUX dev-style (guidance embedding) and
schnell-style models (kiln_server.models.tiny_flux), all on the torch backend.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from e2e_support import field_violations, kinds
from PIL import Image

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.proto.kiln.v1 import generation_service_pb2_grpc as pb_grpc
from kiln_server.models.registry import ModelRegistry
from kiln_server.pipeline.params import GenerationParams
from kiln_server.runtime import load_flux_pipeline

CONFIG = """
[server]
default_model = "sdxl"

[[models]]
name = "sdxl"
path = "{tiny_sdxl}"
default_num_inference_steps = 2

[[models]]
name = "flux-dev"
builtin = "kiln-tiny-flux-dev"
default_num_inference_steps = 3

[[models]]
name = "flux-schnell"
builtin = "kiln-tiny-flux-schnell"

# Guidance as true CFG against the empty prompt by default, as kiln-flux-shapes serves it.
[[models]]
name = "flux-cfg"
builtin = "kiln-tiny-flux-schnell"
default_guidance_scale = 3.0
default_negative_prompt = ""
"""


@pytest.fixture(scope="module")
def config_text(tiny_model_path: Path) -> str:
    return CONFIG.format(tiny_sdxl=tiny_model_path)


@pytest.fixture(scope="module")
def flux_server(
    tmp_path_factory: pytest.TempPathFactory, kiln_cache_dir: Path, config_text: str
) -> Iterator[Any]:
    from conftest import start_server

    server = start_server(
        tmp_path_factory.mktemp("flux-serving"),
        kiln_cache_dir,
        "--backend",
        "torch",
        config=config_text,
    )
    yield server
    server.terminate()


@pytest.fixture(scope="module")
def stub(flux_server: Any) -> Iterator[pb_grpc.GenerationServiceStub]:
    channel = grpc.insecure_channel(flux_server.address)
    yield pb_grpc.GenerationServiceStub(channel)
    channel.close()


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _images(stub: pb_grpc.GenerationServiceStub, **fields: Any) -> list[np.ndarray]:
    events = list(stub.Generate(pb.GenerateRequest(**fields), timeout=120))
    assert kinds(events)[-1] == "completed"
    return [_pixels(e.image.data) for e in events if e.HasField("image")]


def test_list_models_reports_the_flux_family_and_its_limits(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models}
    assert models["sdxl"].family == "sdxl"
    for name in ("flux-dev", "flux-schnell"):
        info = models[name]
        assert info.family == "flux"
        assert list(info.schedulers) == ["FLOW_MATCH_EULER"]
        assert info.default_scheduler == "FLOW_MATCH_EULER"
        assert info.size_multiple == 16
        assert info.backend == "torch"
        assert list(info.preview_methods) == ["latent_rgb"]
    assert models["flux-dev"].default_guidance_scale == pytest.approx(3.5)
    assert models["flux-dev"].distilled_guidance
    assert not models["flux-schnell"].distilled_guidance and not models["sdxl"].distilled_guidance
    assert models["flux-dev"].default_num_inference_steps == 3  # the config's
    assert models["flux-schnell"].default_num_inference_steps == 4
    assert "K_EULER" in models["sdxl"].schedulers


def test_a_flux_image_equals_the_pipeline_run_alone(
    stub: pb_grpc.GenerationServiceStub, config_text: str, kiln_cache_dir: Path, tmp_path: Path
) -> None:
    served = _images(stub, model="flux-dev", prompt="a red circle", seed=11, num_outputs=2)
    registry = ModelRegistry.from_config(
        {**_toml(config_text), "_config_dir": str(tmp_path)}, kiln_cache_dir
    )
    spec = registry.models["flux-dev"]
    pipeline = load_flux_pipeline(spec, "torch", None)
    params = GenerationParams(
        prompt="a red circle",
        width=spec.default_width,
        height=spec.default_height,
        num_outputs=2,
        num_inference_steps=spec.default_num_inference_steps,
        guidance_scale=spec.default_guidance_scale,
        scheduler=spec.default_scheduler,
        seed=11,
        model=spec.name,
    )
    alone = pipeline.generate(params)
    assert len(served) == 2
    for image, reference in zip(served, alone, strict=True):
        assert np.array_equal(image, reference)


def test_a_default_negative_prompt_turns_guidance_into_true_cfg(
    stub: pb_grpc.GenerationServiceStub, config_text: str, kiln_cache_dir: Path, tmp_path: Path
) -> None:
    served = _images(stub, model="flux-cfg", prompt="a red circle", seed=4)
    registry = ModelRegistry.from_config(
        {**_toml(config_text), "_config_dir": str(tmp_path)}, kiln_cache_dir
    )
    spec = registry.models["flux-cfg"]
    assert spec.default_negative_prompt == ""
    pipeline = load_flux_pipeline(spec, "torch", None)
    request = spec.default_request("a red circle", seed=4)
    assert pipeline.true_cfg(request)  # two rows per image against the empty prompt
    assert np.array_equal(served[0], pipeline.generate(request)[0])
    plain = pipeline.generate(replace(request, negative_prompt=None))[0]
    assert not np.array_equal(served[0], plain)
    # A request's own negative prompt replaces the default.
    own = _images(stub, model="flux-cfg", prompt="a red circle", negative_prompt="blue", seed=4)
    assert not np.array_equal(own[0], served[0])


def test_a_default_negative_prompt_on_a_distilled_model_is_refused(
    kiln_cache_dir: Path, tmp_path: Path
) -> None:
    from kiln_server.models.registry import RegistryError

    config = {
        "models": [{"name": "dev", "builtin": "kiln-tiny-flux-dev", "default_negative_prompt": ""}],
        "_config_dir": str(tmp_path),
    }
    with pytest.raises(RegistryError, match="embeds distilled guidance and takes no negative"):
        ModelRegistry.from_config(config, kiln_cache_dir)


def test_both_families_at_once_all_complete_each_as_alone(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    requests = [
        {"model": "flux-dev", "prompt": "a blue square", "seed": 5},
        {"model": "sdxl", "prompt": "a blue square", "seed": 5},
        {"model": "flux-schnell", "prompt": "a blue square", "seed": 5},
        # true classifier-free guidance: two rows per image on the schnell-style model
        {
            "model": "flux-schnell",
            "prompt": "a blue square",
            "negative_prompt": "green",
            "guidance_scale": 3.0,
            "seed": 5,
        },
        {"model": "flux-dev", "prompt": "a yellow cross", "seed": 6, "width": 96},
    ]
    alone = [_images(stub, **fields) for fields in requests]
    with ThreadPoolExecutor(len(requests) * 2) as pool:
        together = list(pool.map(lambda fields: _images(stub, **fields), requests * 2))
    for index, images in enumerate(together):
        reference = alone[index % len(requests)]
        for image, ref in zip(images, reference, strict=True):
            # A batch of other rows changes the float summation order: within 1 level.
            assert np.abs(image.astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.parametrize(
    ("long", "short"),
    [
        ({"model": "sdxl", "num_inference_steps": 150}, {"model": "flux-dev"}),
        (
            {
                "model": "flux-dev",
                "num_inference_steps": 50,
                "width": 256,
                "height": 256,
                "num_outputs": 4,
            },
            {"model": "sdxl"},
        ),
    ],
    ids=["flux beside a long sdxl request", "sdxl beside a long flux request"],
)
def test_a_short_request_is_not_held_behind_a_long_one_of_the_other_family(
    stub: pb_grpc.GenerationServiceStub, long: dict[str, Any], short: dict[str, Any]
) -> None:
    """The families take turns step by step: a short request of one family, sent while a
    long one of the other runs, finishes first, and the long one still completes."""
    import threading
    import time

    running = threading.Event()
    finished: dict[str, float] = {}

    def run_long() -> None:
        for event in stub.Generate(pb.GenerateRequest(prompt="a red circle", **long), timeout=120):
            if event.HasField("progress"):
                running.set()
        finished["long"] = time.monotonic()

    thread = threading.Thread(target=run_long)
    thread.start()
    try:
        assert running.wait(60), "the long request never made progress"
        assert len(_images(stub, prompt="a blue square", **short)) == 1
        finished["short"] = time.monotonic()
    finally:
        thread.join(120)
    assert "long" in finished, "the long request did not complete"
    assert finished["short"] < finished["long"], finished


def _refusal(stub: pb_grpc.GenerationServiceStub, **fields: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(pb.GenerateRequest(**fields), timeout=60))
    return caught.value


def test_flux_refusals_name_the_field(stub: pb_grpc.GenerationServiceStub) -> None:
    cases = [
        ({"model": "flux-dev", "negative_prompt": "blur"}, "negative_prompt", "distilled"),
        ({"model": "flux-dev", "width": 72}, "width", "multiple of 16"),
        ({"model": "flux-schnell", "scheduler": "K_EULER"}, "scheduler", "FLOW_MATCH_EULER"),
    ]
    for fields, field, words in cases:
        error = _refusal(stub, prompt="a red circle", **fields)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in field_violations(error)[field]


def test_flux_img2img_is_served_and_masks_and_loras_are_refused(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, "PNG")
    photo = buffer.getvalue()
    events = list(
        stub.Generate(
            pb.GenerateRequest(
                model="flux-dev", prompt="a red circle", image=photo, strength=0.5, seed=2
            ),
            timeout=120,
        )
    )
    assert kinds(events)[-1] == "completed"
    started = next(e.started for e in events if e.HasField("started"))
    assert started.mode == "image_to_image" and started.strength == pytest.approx(0.5)
    progress = [e.progress for e in events if e.HasField("progress")]
    # 3 steps at strength 0.5 start at int(3 - 1.5) = 1: two steps run.
    assert progress[-1].total_steps == 2
    error = _refusal(stub, model="flux-dev", prompt="a red circle", image=photo, mask=photo)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no mask yet" in field_violations(error)["mask"]
    error = _refusal(
        stub, model="flux-dev", prompt="a red circle", loras=[pb.LoraWeight(name="x", scale=1)]
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "FLUX models serve no LoRAs" in (error.details() or "")


def _toml(text: str) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(text)
