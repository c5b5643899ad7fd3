"""diffusers' own SDXL pipelines over a model's components: the reference.

Kiln's pipeline promises the pixels these produce for the same request, seeds and
scheduler: StableDiffusionXLPipeline for text-to-image, StableDiffusionXLImg2ImgPipeline
for an image, StableDiffusionXLInpaintPipeline for an image and a mask. The parity tests
and the backend benchmark run them through this one class.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from kiln_server.models.loader import SDXLModelFiles, SDXLModules
from kiln_server.pipeline.params import GenerationParams
from kiln_server.pipeline.schedulers import make_scheduler


class DiffusersReference:
    """diffusers' SDXL pipelines built from already-loaded modules (no second load)."""

    def __init__(self, files: SDXLModelFiles, modules: SDXLModules) -> None:
        from diffusers import (
            StableDiffusionXLImg2ImgPipeline,
            StableDiffusionXLInpaintPipeline,
            StableDiffusionXLPipeline,
        )

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
        components = pipeline.components
        img2img: Any = StableDiffusionXLImg2ImgPipeline(**components)
        inpaint: Any = StableDiffusionXLInpaintPipeline(**components)
        self.img2img, self.inpaint = img2img, inpaint
        self.img2img.set_progress_bar_config(disable=True)
        self.inpaint.set_progress_bar_config(disable=True)

    def generate(self, params: GenerationParams) -> np.ndarray:
        """uint8 [N, H, W, 3] for the request; image i is seeded seed + i, as in Kiln.

        An image-conditioned request runs at its ImageConditioning's photo and mask (the
        framed ones, before any overlay, which diffusers does not apply without a crop).
        """
        kwargs: dict[str, Any] = {}
        pipeline = self.pipeline
        conditioning = params.image
        if conditioning is not None:
            kwargs["image"] = Image.fromarray(conditioning.image)
            kwargs["strength"] = conditioning.strength
            pipeline = self.img2img
            if conditioning.mask is not None:
                levels = (conditioning.mask * 255).round().astype(np.uint8)
                kwargs["mask_image"] = Image.fromarray(levels)
                pipeline = self.inpaint
        pipeline.scheduler = make_scheduler(params.scheduler, self.scheduler_config)
        with torch.inference_mode():
            images = pipeline(
                prompt=params.prompt,
                negative_prompt=params.negative_prompt,
                width=params.width,
                height=params.height,
                num_images_per_prompt=params.num_outputs,
                num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale,
                generator=[torch.Generator().manual_seed(seed) for seed in params.seeds],
                output_type="np",
                **kwargs,
            ).images
        return np.asarray((images * 255).round().astype(np.uint8))
