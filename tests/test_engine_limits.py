"""Engines declare what they can run; validation, batching and decoding obey it.

A request outside the loaded engines' declaration is refused with INVALID_ARGUMENT naming
the field and the limit before any work; a VAE that takes fewer images per call than a
request has decodes it in chunks.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_server.engines.base import EngineError, EngineSet
from kiln_server.engines.components import ModelDims, ShapeRange, ShapeRequest
from kiln_server.engines.limits import EngineLimits, declared_limits
from kiln_server.models.registry import ModelRegistry, make_spec
from kiln_server.pipeline.params import GenerationParams
from kiln_server.pipeline.sdxl import SDXLPipeline
from kiln_server.validation import RequestInvalid, ServedLimits, validate_request

MODEL = "tiny"


class LimitedEngine:
    """Wraps an engine, declaring and enforcing a batch limit (and optionally profiles)."""

    def __init__(self, inner: Any, max_batch: int, ranges: list[ShapeRange] | None = None):
        self.inner = inner
        self.spec = inner.spec
        self.max_batch: int | None = max_batch
        self.calls: list[int] = []
        if ranges is not None:
            self.profiles = [self.spec.profile(r) for r in ranges]

    def infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = int(next(iter(inputs.values())).shape[0])
        if batch > (self.max_batch or batch):
            raise EngineError(f"{self.spec.name}: batch {batch} over {self.max_batch}")
        self.calls.append(batch)
        return dict(self.inner.infer(inputs))


def limited(engines: EngineSet, **components: LimitedEngine) -> EngineSet:
    return EngineSet(
        backend="tensorrt",
        text_encoder=components.get("text_encoder", engines.text_encoder),
        text_encoder_2=components.get("text_encoder_2", engines.text_encoder_2),
        unet=components.get("unet", engines.unet),
        vae_decoder=components.get("vae_decoder", engines.vae_decoder),
        vae_encoder=engines.vae_encoder,
        device=engines.device,
    )


def test_eager_torch_declares_the_vae_step_and_no_bounds(tiny_pipeline: Any) -> None:
    limits = tiny_pipeline.limits
    # The tiny model has a learned preview decoder; eager torch runs any batch of it.
    assert limits == EngineLimits(size_multiple=8, preview_decoder=True, image_inputs=True)


def test_graph_size_multiple_follows_the_unet_depth() -> None:
    assert ModelDims().graph_size_multiple == 32  # SDXL: 3 blocks, 2 halvings, VAE x8
    assert ModelDims(unet_downsamples=1).graph_size_multiple == 16


def test_profiles_bound_sizes_and_rows(tiny_pipeline: Any) -> None:
    """TensorRT-style profiles: the union over profiles, the intersection over components."""
    engines = tiny_pipeline.engines
    small, large = ShapeRequest(1, 64, 64), ShapeRequest(4, 128, 160)
    unet = LimitedEngine(engines.unet, 4, [ShapeRange(small, small, large)])
    vae = LimitedEngine(
        engines.vae_decoder,
        2,
        [ShapeRange(ShapeRequest(1, 32, 64), small, ShapeRequest(2, 96, 96))],
    )
    limits = declared_limits(limited(engines, unet=unet, vae_decoder=vae), tiny_pipeline.dims)
    assert (limits.min_width, limits.max_width) == (64, 96)
    assert (limits.min_height, limits.max_height) == (64, 96)
    assert limits.unet_rows == 4 and limits.vae_decoder_images == 2
    assert limits.size_multiple == tiny_pipeline.dims.graph_size_multiple


def test_a_large_request_decodes_in_chunks_the_vae_takes(tiny_pipeline: Any) -> None:
    engines = tiny_pipeline.engines
    vae = LimitedEngine(engines.vae_decoder, 2)
    chunked = SDXLPipeline(tiny_pipeline.files, limited(engines, vae_decoder=vae))
    assert chunked.limits.vae_decoder_images == 2
    params = GenerationParams(prompt="five circles", num_outputs=5, num_inference_steps=3, seed=9)
    images = chunked.generate(params)
    assert vae.calls == [2, 2, 1]
    for image, want in zip(images, tiny_pipeline.generate(params), strict=True):
        # CPU kernels block by batch size, so a chunk may round one level differently.
        assert abs(image.astype(int) - want.astype(int)).max() <= 1


def validator(model_path: Path, engines: EngineLimits) -> Any:
    """validate_request for the tiny model (sides 64-512) served on `engines`."""
    from kiln_server.models.loader import read_model_files
    from kiln_server.pipeline.prompts import PromptTokenizer

    spec = make_spec(MODEL, model_path, {"min_size": 64, "max_size": 512})
    registry = ModelRegistry(models={MODEL: spec}, default_model=MODEL)
    tokenizer = PromptTokenizer.for_model(read_model_files(model_path))

    def run(**fields: Any) -> GenerationParams:
        return validate_request(
            pb.GenerateRequest(prompt="a cat", **fields),
            registry,
            lambda _model, text: tokenizer.count_tokens(text),
            lambda _model: tokenizer.max_tokens,
            lambda _model: engines,
        )

    return run


@pytest.fixture(scope="module")
def validate(tiny_model_path: Path) -> Any:
    return validator(
        tiny_model_path,
        EngineLimits(
            size_multiple=16,
            min_width=64,
            max_width=256,
            min_height=64,
            max_height=192,
            unet_rows=6,
        ),
    )


def refused(validate: Any, **fields: Any) -> dict[str, str]:
    with pytest.raises(RequestInvalid) as raised:
        validate(**fields)
    return {v.field: v.description for v in raised.value.violations}


def test_sizes_outside_the_engines_are_refused_naming_the_field(validate: Any) -> None:
    assert refused(validate, width=72, height=64) == {
        "width": "must be a multiple of 16 for this model's engines, got 72"
    }
    assert refused(validate, width=64, height=208) == {
        "height": "must be between 64 and 192, got 208"
    }
    assert refused(validate, width=272, height=64)["width"] == "must be between 64 and 256, got 272"
    params = validate(width=256, height=192)
    assert (params.width, params.height) == (256, 192)


def test_outputs_beyond_the_unet_rows_are_refused(validate: Any) -> None:
    """6 UNet rows: 3 images under guidance, 6 without (guidance 1 needs no second branch)."""
    assert validate(num_outputs=3, guidance_scale=5.0, width=64, height=64).num_outputs == 3
    problem = refused(validate, num_outputs=4, guidance_scale=5.0, width=64, height=64)
    assert problem["num_outputs"].startswith("must be at most 3 at guidance_scale 5")
    assert "6 UNet rows per call" in problem["num_outputs"]
    assert validate(num_outputs=6, guidance_scale=1.0, width=64, height=64).num_outputs == 6


def test_served_limits_round_inward_to_the_size_step(tiny_model_path: Path) -> None:
    spec = make_spec(MODEL, tiny_model_path, {"min_size": 72, "max_size": 1000})
    limits = ServedLimits.of(spec, EngineLimits(size_multiple=32))
    assert limits.size_range("width") == (96, 992)
    assert ServedLimits.of(spec, None).size_range("height") == (72, 1000)


def test_engines_that_cannot_run_a_request_refuse_it_by_name(tiny_model_path: Path) -> None:
    """One UNet row per call cannot run guidance; a size range that misses every step of
    the size multiple admits no size: both are refused, never admitted to fail later."""
    run = validator(
        tiny_model_path, EngineLimits(size_multiple=32, min_width=70, max_width=90, unet_rows=1)
    )

    problems = refused(run, width=64, height=64, guidance_scale=5.0)
    assert problems["guidance_scale"].startswith("must be at most 1 for this model's engines")
    assert problems["width"].startswith("this model's engines run no width in steps of 32")
    assert "num_outputs" not in problems
