"""diffusers' own FluxPipeline over a FLUX folder: the reference for Kiln's FLUX pipeline.

Kiln's FluxPipeline promises the pixels this produces for the same request and seeds. The
reference loads the folder in float32 with `FluxPipeline.from_pretrained(folder,
local_files_only=True)` (independently of Kiln's loader) and maps a GenerationParams onto
its arguments: the served T5 length as `max_sequence_length`, `guidance_scale` as the
distilled guidance, and on a schnell-style model with a negative prompt
`true_cfg_scale = guidance_scale`; a request with an image runs diffusers'
FluxImg2ImgPipeline over the same components.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln_server.pipeline.params import GenerationParams


class FluxDiffusersReference:
    """diffusers' FluxPipeline loaded from a FLUX folder on the CPU in float32."""

    def __init__(self, folder: Path, max_sequence_length: int) -> None:
        from diffusers import FluxPipeline

        pipeline: Any = FluxPipeline.from_pretrained(
            folder, local_files_only=True, torch_dtype=torch.float32
        )
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline
        self.max_sequence_length = max_sequence_length

    def generate(self, params: GenerationParams) -> np.ndarray:
        """uint8 [N, H, W, 3] for the request; image i is seeded seed + i, as in Kiln."""
        kwargs: dict[str, Any] = {}
        pipeline: Any = self.pipeline
        if params.image is not None:
            from diffusers import FluxImg2ImgPipeline
            from PIL import Image

            # The same components, as diffusers' image-to-image FLUX pipeline.
            pipeline = FluxImg2ImgPipeline(**self.pipeline.components)
            pipeline.set_progress_bar_config(disable=True)
            kwargs["image"] = Image.fromarray(params.image.image)
            kwargs["strength"] = params.image.strength
        if params.negative_prompt is not None:
            kwargs["negative_prompt"] = params.negative_prompt
            kwargs["true_cfg_scale"] = params.guidance_scale
        with torch.inference_mode():
            images = pipeline(
                prompt=params.prompt,
                width=params.width,
                height=params.height,
                num_images_per_prompt=params.num_outputs,
                num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale,
                max_sequence_length=self.max_sequence_length,
                generator=[torch.Generator().manual_seed(seed) for seed in params.seeds],
                output_type="np",
                **kwargs,
            ).images
        return np.asarray((images * 255).round().astype(np.uint8))
