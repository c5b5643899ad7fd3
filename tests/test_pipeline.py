"""Kiln's own SDXL denoising loop against diffusers' StableDiffusionXLPipeline.

The reference is diffusers' pipeline built from the same tiny model's components, seeds
and scheduler. On the torch backend the two agree exactly today; the assertion allows one
uint8 level so that a harmless change in operation order does not read as a regression.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiln_server.pipeline.params import GenerationParams
from kiln_server.pipeline.reference import DiffusersReference
from kiln_server.pipeline.schedulers import scheduler_names

STEPS = 4


@pytest.fixture(scope="module")
def diffusers_reference(tiny_model_path: Path) -> DiffusersReference:
    """diffusers' StableDiffusionXLPipeline over the tiny model's own components."""
    from kiln_server.models.loader import load_modules, read_model_files

    return DiffusersReference(read_model_files(tiny_model_path), load_modules(tiny_model_path))


def max_level_difference(a: np.ndarray, b: np.ndarray) -> int:
    """Largest per-channel difference between two uint8 image stacks of equal shape."""
    assert a.shape == b.shape
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


PARITY_CASES = {
    "square, no negative": {"num_outputs": 1, "width": 64, "height": 64},
    "non-square, negative, two outputs": {
        "num_outputs": 2,
        "width": 64,
        "height": 40,
        "negative_prompt": "blurry, low quality",
    },
}


@pytest.mark.parametrize("case", PARITY_CASES.values(), ids=PARITY_CASES.keys())
@pytest.mark.parametrize("scheduler", scheduler_names())
def test_matches_diffusers(
    tiny_pipeline: Any,
    diffusers_reference: DiffusersReference,
    scheduler: str,
    case: dict[str, Any],
) -> None:
    params = GenerationParams(
        prompt="a product photo of a teapot on marble",
        num_inference_steps=STEPS,
        guidance_scale=6.0,
        scheduler=scheduler,
        seed=1234,
        **case,
    )
    ours = np.stack(tiny_pipeline.generate(params))
    theirs = diffusers_reference.generate(params)
    assert ours.shape == (params.num_outputs, params.height, params.width, 3)
    assert max_level_difference(ours, theirs) <= 1


@pytest.mark.parametrize("scheduler", scheduler_names())
def test_matches_diffusers_without_guidance(
    tiny_pipeline: Any, diffusers_reference: DiffusersReference, scheduler: str
) -> None:
    """guidance_scale 1.0 skips the unconditional branch in both pipelines, so a multistep
    scheduler's history holds the UNet's outputs directly."""
    params = GenerationParams(
        prompt="a teapot",
        num_inference_steps=STEPS,
        guidance_scale=1.0,
        scheduler=scheduler,
        seed=99,
    )
    ours = np.stack(tiny_pipeline.generate(params))
    assert max_level_difference(ours, diffusers_reference.generate(params)) <= 1


@pytest.mark.parametrize("scheduler", ["K_EULER", "K_EULER_ANCESTRAL"])
def test_image_i_of_seed_s_is_image_0_of_seed_s_plus_i(tiny_pipeline: Any, scheduler: str) -> None:
    """Variations are reproducible one by one: a user can re-run just the one they liked."""
    base = GenerationParams(
        prompt="a teapot", num_outputs=3, num_inference_steps=STEPS, scheduler=scheduler, seed=40
    )
    together = tiny_pipeline.generate(base)
    assert len(together) == 3
    for index, image in enumerate(together):
        alone = tiny_pipeline.generate(
            GenerationParams(
                prompt="a teapot",
                num_inference_steps=STEPS,
                scheduler=scheduler,
                seed=base.seed + index,
            )
        )
        assert max_level_difference(image[None], alone[0][None]) <= 1
    # ...and the variations are really different images.
    assert not np.array_equal(together[0], together[1])


def test_same_request_same_pixels(tiny_pipeline: Any) -> None:
    params = GenerationParams(
        prompt="a teapot", num_inference_steps=STEPS, scheduler="K_EULER_ANCESTRAL", seed=7
    )
    first, second = tiny_pipeline.generate(params), tiny_pipeline.generate(params)
    np.testing.assert_array_equal(np.stack(first), np.stack(second))


def test_seed_and_prompt_change_the_image(tiny_pipeline: Any) -> None:
    base = GenerationParams(prompt="a teapot", num_inference_steps=STEPS, seed=7)
    reference = tiny_pipeline.generate(base)[0]
    other_seed = tiny_pipeline.generate(GenerationParams(**{**base.__dict__, "seed": 8}))[0]
    other_prompt = tiny_pipeline.generate(
        GenerationParams(**{**base.__dict__, "prompt": "a red bicycle"})
    )[0]
    assert not np.array_equal(reference, other_seed)
    assert not np.array_equal(reference, other_prompt)


def test_progress_counts_unet_evaluations(tiny_pipeline: Any) -> None:
    """total_steps is what progress reports: Heun takes about two evaluations per step."""
    for scheduler, expected in (("K_EULER", 5), ("DDIM", 5), ("HeunDiscrete", 9)):
        params = GenerationParams(
            prompt="a teapot", num_inference_steps=5, scheduler=scheduler, seed=1
        )
        state = tiny_pipeline.prepare(params)
        assert state.total_steps == expected
        seen = []
        while not state.finished:
            tiny_pipeline.denoise_step([state])
            seen.append(state.step_index)
        assert seen == list(range(1, expected + 1))
