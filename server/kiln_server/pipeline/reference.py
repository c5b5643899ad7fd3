"""diffusers' own StableDiffusionXLPipeline over a model's components: the reference.

Kiln's pipeline promises the pixels this produces for the same request, seeds and
scheduler; the parity tests and the backend benchmark both run it through this one class.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kiln_server.models.loader import SDXLModelFiles, SDXLModules
from kiln_server.pipeline.params import GenerationParams
from kiln_server.pipeline.schedulers import make_scheduler


class DiffusersReference:
    """StableDiffusionXLPipeline built from already-loaded modules (no second load)."""

    def __init__(self, files: SDXLModelFiles, modules: SDXLModules) -> None:
        from diffusers import StableDiffusionXLPipeline

        self.scheduler_config = files.scheduler_config
        pipeline: Any = StableDiffusionXLPipeline(
            vae=modules.vae,
            text_encoder=modules.text_encoder,
            text_encoder_2=modules.text_encoder_2,
            tokenizer=files.tokenizer,
            tokenizer_2=files.tokenizer_2,
            unet=modules.unet,
            scheduler=make_scheduler("K_EULER", files.scheduler_config),
            add_watermarker=False,
        )
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline

    def generate(self, params: GenerationParams) -> np.ndarray:
        """uint8 [N, H, W, 3] for the request; image i is seeded seed + i, as in Kiln."""
        self.pipeline.scheduler = make_scheduler(params.scheduler, self.scheduler_config)
        with torch.inference_mode():
            images = self.pipeline(
                prompt=params.prompt,
                negative_prompt=params.negative_prompt,
                width=params.width,
                height=params.height,
                num_images_per_prompt=params.num_outputs,
                num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale,
                generator=[torch.Generator().manual_seed(seed) for seed in params.seeds],
                output_type="np",
            ).images
        return np.asarray((images * 255).round().astype(np.uint8))
