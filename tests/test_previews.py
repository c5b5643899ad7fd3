"""Latent previews: SDXL's linear latent-to-RGB map, sizes and encodings a client can show."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from kiln_server.pipeline.params import GenerationParams, PreviewParams
from kiln_server.pipeline.previews import (
    SDXL_LATENT_RGB_BIAS,
    SDXL_LATENT_RGB_FACTORS,
    LatentPreviewer,
)


def expected_rgb(latent: list[float]) -> np.ndarray:
    """The RGB a single latent pixel maps to: factors and bias, then [-1, 1] -> [0, 255]."""
    rgb = np.asarray(latent) @ np.asarray(SDXL_LATENT_RGB_FACTORS) + np.asarray(
        SDXL_LATENT_RGB_BIAS
    )
    return np.asarray((np.clip((rgb + 1) / 2, 0, 1) * 255).round(), dtype=np.uint8)


def test_each_latent_pixel_maps_linearly_to_rgb() -> None:
    latents = torch.zeros(1, 4, 2, 3)
    latents[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    latents[0, :, 1, 2] = torch.tensor([0.2, -0.5, 0.7, -0.1])
    rgb = LatentPreviewer().to_rgb(latents).numpy()
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0, 0], expected_rgb([1, 0, 0, 0]))
    np.testing.assert_array_equal(rgb[1, 2], expected_rgb([0.2, -0.5, 0.7, -0.1]))
    np.testing.assert_array_equal(rgb[0, 1], expected_rgb([0, 0, 0, 0]))  # bias only


def test_outputs_are_laid_side_by_side() -> None:
    latents = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    previewer = LatentPreviewer()
    together = previewer.to_rgb(latents).numpy()
    assert together.shape == (5, 18, 3)
    for index in range(3):
        alone = previewer.to_rgb(latents[index : index + 1]).numpy()
        np.testing.assert_array_equal(together[:, 6 * index : 6 * (index + 1)], alone)


def test_model_folder_factors_replace_sdxl_defaults() -> None:
    identity = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]]
    custom = LatentPreviewer.for_model(
        {"latent_rgb_factors": identity, "latent_rgb_bias": [0, 0, 0]}
    )
    latents = torch.tensor([0.0, 1.0, -1.0, 5.0]).reshape(1, 4, 1, 1)
    np.testing.assert_array_equal(custom.to_rgb(latents).numpy()[0, 0], [128, 255, 0])
    # Without both keys a model gets SDXL's factors.
    sdxl = LatentPreviewer.for_model({"latent_rgb_factors": identity})
    np.testing.assert_array_equal(sdxl.to_rgb(latents).numpy()[0, 0], expected_rgb([0, 1, -1, 5]))


@pytest.mark.parametrize(
    ("fmt", "mime", "pil_format"), [("jpeg", "image/jpeg", "JPEG"), ("webp", "image/webp", "WEBP")]
)
@pytest.mark.parametrize(
    ("batch", "h", "w", "max_size"), [(1, 8, 8, 64), (2, 6, 8, 100), (1, 12, 4, 20)]
)
def test_encoded_preview_fits_and_decodes(
    fmt: str, mime: str, pil_format: str, batch: int, h: int, w: int, max_size: int
) -> None:
    latents = torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(1))
    previewer = LatentPreviewer()
    preview = previewer.encode(previewer.to_rgb(latents).numpy(), max_size, fmt, quality=70)
    assert preview.mime_type == mime
    image = Image.open(io.BytesIO(preview.data))
    assert image.format == pil_format
    assert image.size == (preview.width, preview.height)
    assert max(image.size) <= max_size
    # Aspect ratio of the side-by-side latents is kept (within rounding of one pixel).
    assert abs(image.width / image.height - (batch * w) / h) <= (batch * w) / h / min(image.size)


def test_pipeline_preview_of_a_running_request(tiny_pipeline: Any) -> None:
    params = GenerationParams(
        prompt="a teapot", width=96, height=64, num_outputs=2, num_inference_steps=3, seed=5
    )
    state = tiny_pipeline.prepare(params)
    options = PreviewParams(every_n_steps=1, max_size=48, format="webp", quality=50)
    before = tiny_pipeline.preview(state, options)  # from the initial noise
    tiny_pipeline.denoise_step([state])
    after = tiny_pipeline.preview(state, options)  # from the predicted clean image
    for preview in (before, after):
        image = Image.open(io.BytesIO(preview.data))
        assert image.format == "WEBP"
        # Two 96x64 outputs side by side: 192x64, scaled to a longest side of at most 48.
        assert max(image.size) <= 48 and image.width > image.height
    assert before.data != after.data
