"""Image-conditioned generation in Kiln's own loop against diffusers' pipelines.

img2img must equal StableDiffusionXLImg2ImgPipeline and inpainting
StableDiffusionXLInpaintPipeline on the same components, photo, mask, seeds, scheduler
and strength: with the tiny model's plain 4-channel UNet (the re-noised photo blended in
outside the mask after every step) and with a 9-channel inpainting UNet (mask and masked
photo latents as UNet inputs). As for text-to-image, one uint8 level is allowed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kiln_server.pipeline.params import GenerationParams, ImageConditioning
from kiln_server.pipeline.reference import DiffusersReference

STEPS = 5
SCHEDULERS = ("K_EULER", "DDIM", "DPMSolverMultistep", "HeunDiscrete", "K_EULER_ANCESTRAL")


def product_photo(width: int = 64, height: int = 48) -> np.ndarray:
    """A red disc on a blue-to-green gradient, uint8 [height, width, 3]."""
    y, x = np.mgrid[0:height, 0:width]
    photo = np.stack(
        [np.full_like(x, 30), 60 + 150 * x // width, 200 - 120 * y // height], axis=-1
    ).astype(np.uint8)
    disc = (x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 4) ** 2
    photo[disc] = (220, 30, 40)
    return photo


def background_mask(width: int = 64, height: int = 48) -> np.ndarray:
    """float32 [height, width]: 1 (repaint) outside a centred box, 0 (keep) inside, with
    a grey band that both pipelines binarize at 0.5."""
    mask = np.ones((height, width), np.float32)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 0.0
    mask[height // 4 - 2 : height // 4, :] = 0.4
    return mask


def max_level_difference(a: np.ndarray, b: np.ndarray) -> int:
    """Largest per-channel difference between two uint8 image stacks of equal shape."""
    assert a.shape == b.shape
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def request(conditioning: ImageConditioning, scheduler: str, **overrides: Any) -> GenerationParams:
    height, width = conditioning.image.shape[:2]
    settings: dict[str, Any] = {
        "prompt": "a product photo of a teapot on marble",
        "negative_prompt": "blurry",
        "width": width,
        "height": height,
        "num_outputs": 2,
        "num_inference_steps": STEPS,
        "guidance_scale": 6.0,
        "scheduler": scheduler,
        "seed": 77,
        "image": conditioning,
    }
    return GenerationParams(**{**settings, **overrides})


@pytest.fixture(scope="module")
def diffusers_reference(tiny_model_path: Path) -> DiffusersReference:
    from kiln_server.models.loader import load_modules, read_model_files

    return DiffusersReference(read_model_files(tiny_model_path), load_modules(tiny_model_path))


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img_matches_diffusers(
    tiny_pipeline: Any, diffusers_reference: DiffusersReference, scheduler: str, strength: float
) -> None:
    params = request(ImageConditioning(product_photo(), strength), scheduler)
    ours = np.stack(tiny_pipeline.generate(params))
    assert ours.shape == (2, 48, 64, 3)
    assert max_level_difference(ours, diffusers_reference.generate(params)) <= 1


def test_strength_sets_the_first_timestep_and_the_steps(tiny_pipeline: Any) -> None:
    """int(steps x strength) steps run, from that point of the schedule on (get_timesteps)."""
    full = tiny_pipeline.prepare(request(ImageConditioning(product_photo(), 1.0), "K_EULER"))
    for strength, expected_steps in ((0.3, 1), (0.5, 2), (0.99, 4)):
        state = tiny_pipeline.prepare(
            request(ImageConditioning(product_photo(), strength), "K_EULER")
        )
        assert state.total_steps == expected_steps
        assert torch.equal(state.timesteps, full.timesteps[STEPS - expected_steps :])


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("strength", [0.7, 1.0])
def test_inpainting_matches_diffusers(
    tiny_pipeline: Any, diffusers_reference: DiffusersReference, scheduler: str, strength: float
) -> None:
    conditioning = ImageConditioning(product_photo(), strength, background_mask())
    params = request(conditioning, scheduler)
    ours = np.stack(tiny_pipeline.generate(params))
    assert max_level_difference(ours, diffusers_reference.generate(params)) <= 1


@pytest.fixture(scope="module")
def inpainting_model(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a 9-channel inpainting UNet (seeded random weights)."""
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("inpainting") / "tiny-inpainting"
    shutil.copytree(tiny_model_path, folder)
    config = dict(UNet2DConditionModel.load_config(folder / "unet"))
    config["in_channels"] = 9
    torch.manual_seed(9)
    UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    return folder


@pytest.mark.parametrize("scheduler", ("K_EULER", "DDIM", "DPMSolverMultistep"))
@pytest.mark.parametrize("strength", [0.7, 1.0])
def test_inpainting_unet_matches_diffusers(
    inpainting_model: Path, scheduler: str, strength: float
) -> None:
    from kiln_server.engines.torch_engine import load_torch_engines
    from kiln_server.models.loader import load_modules, read_model_files
    from kiln_server.pipeline.sdxl import SDXLPipeline

    files = read_model_files(inpainting_model)
    assert files.dims.inpainting and files.dims.unet_in_channels == 9
    modules = load_modules(inpainting_model)
    pipeline = SDXLPipeline(files, load_torch_engines(modules, files.dims))
    assert pipeline.limits.inpainting
    params = request(ImageConditioning(product_photo(), strength, background_mask()), scheduler)
    ours = np.stack(pipeline.generate(params))
    theirs = DiffusersReference(files, modules).generate(params)
    assert max_level_difference(ours, theirs) <= 1


def test_image_jobs_share_unet_calls_with_text_jobs(tiny_pipeline: Any) -> None:
    """A text-to-image job, an img2img job and an inpainting job of one latent shape
    advance together, one UNet call a step with each row at its own timestep, and each
    ends with the images it gets alone."""
    jobs = [
        request(ImageConditioning(product_photo(), 1.0), "K_EULER", image=None),
        request(ImageConditioning(product_photo(), 0.6), "DPMSolverMultistep"),
        request(ImageConditioning(product_photo(), 0.8, background_mask()), "DDIM"),
    ]
    alone = [np.stack(tiny_pipeline.generate(params)) for params in jobs]
    states = [tiny_pipeline.prepare(params) for params in jobs]
    assert [state.total_steps for state in states] == [STEPS, 3, 4]
    while any(not state.finished for state in states):
        running = [state for state in states if not state.finished]
        result = tiny_pipeline.denoise_step(running)
        assert result.rows == sum(state.rows for state in running)
    together = [tiny_pipeline.decode(state).cpu().numpy() for state in states]
    for ours, theirs in zip(together, alone, strict=True):
        assert max_level_difference(ours, theirs) <= 1
