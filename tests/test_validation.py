"""Request validation in-process: defaults resolved, every bad field named, nothing else.

The model is the tiny SDXL model's real tokenizers and serving limits (kiln.json), so the
token limit is the real CLIP one (77 tokens including the start and end tokens).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_server.models.registry import ModelRegistry, make_spec
from kiln_server.pipeline.params import GenerationParams, PreviewParams
from kiln_server.pipeline.schedulers import scheduler_names
from kiln_server.validation import ModelNotFound, RequestInvalid, validate_request

MODEL = "tiny"


@pytest.fixture(scope="module")
def registry(tiny_model_path: Path) -> ModelRegistry:
    """A registry serving the tiny model under its folder's own defaults and limits."""
    return ModelRegistry(models={MODEL: make_spec(MODEL, tiny_model_path, {})}, default_model=MODEL)


@pytest.fixture(scope="module")
def validate(registry: ModelRegistry, tiny_model_path: Path) -> Any:
    """validate_request bound to the registry and the model's real tokenizers."""
    from kiln_server.models.loader import read_model_files
    from kiln_server.pipeline.prompts import PromptTokenizer

    tokenizer = PromptTokenizer.for_model(read_model_files(tiny_model_path))

    def run(request: pb.GenerateRequest) -> GenerationParams:
        return validate_request(
            request,
            registry,
            lambda _model, text: tokenizer.count_tokens(text),
            lambda _model: tokenizer.max_tokens,
        )

    return run


def violations(validate: Any, request: pb.GenerateRequest) -> dict[str, str]:
    """field -> description of every violation; fails if the request was accepted."""
    with pytest.raises(RequestInvalid) as raised:
        validate(request)
    fields = [v.field for v in raised.value.violations]
    assert len(fields) == len(set(fields)), f"a field is reported twice: {fields}"
    return {v.field: v.description for v in raised.value.violations}


def words(n: int) -> str:
    """A prompt of exactly n CLIP tokens plus the start and end tokens."""
    return " ".join(["cat"] * n)


def test_defaults_resolve_from_the_model(validate: Any, registry: ModelRegistry) -> None:
    spec = registry.models[MODEL]
    params = validate(pb.GenerateRequest(prompt="a teapot"))
    assert params.model == MODEL
    assert (params.width, params.height) == (spec.default_width, spec.default_height)
    assert params.num_inference_steps == spec.default_num_inference_steps
    assert params.guidance_scale == spec.default_guidance_scale
    assert params.scheduler == spec.default_scheduler
    assert params.num_outputs == 1
    assert params.negative_prompt is None  # absent negative prompt: zero embeddings
    assert params.output_format == "png"
    assert params.output_quality == 90
    # No engines declared here, so no preview decoder: the default is the latent-RGB map.
    assert params.preview == PreviewParams(
        every_n_steps=0, max_size=256, format="jpeg", quality=75, method="latent_rgb"
    )
    assert params.priority == 2  # unspecified means normal
    assert 0 <= params.seed < 2**32


def test_explicit_values_are_kept(validate: Any) -> None:
    request = pb.GenerateRequest(
        model=MODEL,
        prompt="a teapot",
        negative_prompt="blurry",
        width=96,
        height=48,
        num_outputs=3,
        num_inference_steps=12,
        guidance_scale=0.0,  # explicitly zero, not "absent"
        scheduler="DDIM",
        seed=2**64 - 3,  # the largest seed whose three images still fit in uint64
        output_format=pb.OUTPUT_FORMAT_WEBP,
        output_quality=55,
        preview=pb.PreviewOptions(
            every_n_steps=2, max_size=64, format=pb.PREVIEW_FORMAT_WEBP, quality=30
        ),
        priority=pb.PRIORITY_HIGH,
    )
    params = validate(request)
    assert params.negative_prompt == "blurry"
    assert (params.width, params.height, params.num_outputs) == (96, 48, 3)
    assert params.num_inference_steps == 12
    assert params.guidance_scale == 0.0
    assert not params.do_classifier_free_guidance
    assert params.scheduler == "DDIM"
    assert params.seeds == [2**64 - 3, 2**64 - 2, 2**64 - 1]
    assert (params.output_format, params.output_quality) == ("webp", 55)
    assert params.preview == PreviewParams(
        every_n_steps=2, max_size=64, format="webp", quality=30, method="latent_rgb"
    )
    assert params.priority == 3


def test_random_seeds_differ_between_requests(validate: Any) -> None:
    seeds = {validate(pb.GenerateRequest(prompt="a teapot")).seed for _ in range(8)}
    assert len(seeds) > 1


@pytest.mark.parametrize("name", scheduler_names())
def test_every_advertised_scheduler_is_accepted(validate: Any, name: str) -> None:
    assert validate(pb.GenerateRequest(prompt="a teapot", scheduler=name)).scheduler == name


def test_prompt_of_exactly_the_token_limit_is_accepted(validate: Any) -> None:
    validate(pb.GenerateRequest(prompt=words(75), negative_prompt=words(75)))


BAD_REQUESTS: dict[str, tuple[dict[str, Any], str]] = {
    "empty prompt": ({"prompt": ""}, "prompt"),
    "blank prompt": ({"prompt": "  \n\t"}, "prompt"),
    "prompt over 77 tokens": ({"prompt": words(76)}, "prompt"),
    "prompt over the character cap": ({"prompt": "a" * 5000}, "prompt"),
    "negative prompt over 77 tokens": ({"negative_prompt": words(100)}, "negative_prompt"),
    "width not a multiple of 8": ({"width": 100}, "width"),
    "height not a multiple of 8": ({"height": 60}, "height"),
    "width below the minimum": ({"width": 24}, "width"),
    "height above the maximum": ({"height": 1024}, "height"),
    "too many steps": ({"num_inference_steps": 151}, "num_inference_steps"),
    "negative guidance": ({"guidance_scale": -1.0}, "guidance_scale"),
    "NaN guidance": ({"guidance_scale": math.nan}, "guidance_scale"),
    "infinite guidance": ({"guidance_scale": math.inf}, "guidance_scale"),
    "guidance too large": ({"guidance_scale": 51.0}, "guidance_scale"),
    "too many outputs": ({"num_outputs": 9}, "num_outputs"),
    "unknown scheduler": ({"scheduler": "K_LMS_TURBO"}, "scheduler"),
    "scheduler name in the wrong case": ({"scheduler": "ddim"}, "scheduler"),
    "unknown output format": ({"output_format": 17}, "output_format"),
    "output quality over 100": ({"output_quality": 101}, "output_quality"),
    "unknown priority": ({"priority": 9}, "priority"),
    "unknown preview format": ({"preview": {"format": 5}}, "preview.format"),
    "preview size too small": ({"preview": {"max_size": 8}}, "preview.max_size"),
    "preview size too large": ({"preview": {"max_size": 4096}}, "preview.max_size"),
    "preview quality over 100": ({"preview": {"quality": 300}}, "preview.quality"),
    "seed overflows with its outputs": ({"seed": 2**64 - 1, "num_outputs": 2}, "seed"),
}


def bad_request(fields: dict[str, Any]) -> pb.GenerateRequest:
    """A valid request with `fields` overriding it."""
    request = pb.GenerateRequest(prompt="a teapot", seed=1)
    preview = fields.pop("preview", None)
    for name, value in fields.items():
        setattr(request, name, value)
    if preview:
        for name, value in preview.items():
            setattr(request.preview, name, value)
    return request


@pytest.mark.parametrize(("fields", "field"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_field_is_named(validate: Any, fields: dict[str, Any], field: str) -> None:
    found = violations(validate, bad_request(dict(fields)))
    assert list(found) == [field]
    assert found[field]  # a description a user can act on


def test_token_limit_message_says_how_long(validate: Any) -> None:
    found = violations(validate, pb.GenerateRequest(prompt=words(90)))
    assert "92 tokens" in found["prompt"] and "77" in found["prompt"]


def test_zero_steps_means_the_default_not_an_error(validate: Any, registry: ModelRegistry) -> None:
    params = validate(pb.GenerateRequest(prompt="a teapot", num_inference_steps=0))
    assert params.num_inference_steps == registry.models[MODEL].default_num_inference_steps


def test_every_bad_field_is_reported_at_once(validate: Any) -> None:
    request = pb.GenerateRequest(
        prompt="",
        width=30,
        height=4096,
        num_inference_steps=500,
        guidance_scale=-2,
        num_outputs=99,
        scheduler="nope",
        output_format=8,
        output_quality=1000,
        priority=42,
        preview=pb.PreviewOptions(max_size=1, format=9),
    )
    assert set(violations(validate, request)) == {
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


def test_unknown_model_is_not_found(validate: Any) -> None:
    with pytest.raises(ModelNotFound) as raised:
        validate(pb.GenerateRequest(model="sdxl-turbo", prompt="a teapot"))
    assert "sdxl-turbo" in str(raised.value) and MODEL in str(raised.value)


def test_work_over_the_budget_names_every_factor(
    registry: ModelRegistry, tiny_model_path: Path
) -> None:
    """steps x outputs x megapixels over the server's bound is refused naming the four
    fields that make it; an image request counts only the steps its strength runs."""
    from kiln_server.models.loader import read_model_files
    from kiln_server.pipeline.prompts import PromptTokenizer
    from kiln_server.validation import RequestBudget

    tokenizer = PromptTokenizer.for_model(read_model_files(tiny_model_path))

    def check(request: pb.GenerateRequest) -> GenerationParams:
        return validate_request(
            request,
            registry,
            lambda _model, text: tokenizer.count_tokens(text),
            lambda _model: tokenizer.max_tokens,
            budget=RequestBudget(max_work=10.0),
        )

    # 100 steps x 4 outputs x 0.065 MP = 26 units
    big = pb.GenerateRequest(
        prompt="a", num_inference_steps=100, num_outputs=4, width=256, height=256
    )
    found = violations(check, big)
    assert set(found) == {"num_inference_steps", "num_outputs", "width", "height"}
    assert "26 units of work" in found["width"] and "at most 10" in found["width"]
    assert check(
        pb.GenerateRequest(prompt="a", num_inference_steps=30, num_outputs=4, width=256, height=256)
    )


def test_echoed_input_is_cut_short(validate: Any) -> None:
    """A 100,000-character value does not come back whole in the error text."""
    found = violations(validate, pb.GenerateRequest(prompt="a", scheduler="X" * 100_000))
    assert len(found["scheduler"]) < 300
    with pytest.raises(ModelNotFound) as raised:
        validate(pb.GenerateRequest(prompt="a", model="m" * 100_000))
    assert len(str(raised.value)) < 300
