"""Generate images from a model folder with diffusers' StableDiffusionXLPipeline.

The reference sampler for training checks, tests and the adherence benchmark: it runs the
same computation as Kiln's serving pipeline (SDXL prompt encoding with the zero negative,
seeded latents, classifier-free guidance, a scheduler step per denoising step, VAE decode).
Schedulers are named as in Replicate's SDXL API, like Kiln's `scheduler` request field.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Replicate's SDXL scheduler names → (diffusers class, extra config).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DDIM": ("DDIMScheduler", {}),
    "DPMSolverMultistep": ("DPMSolverMultistepScheduler", {}),
    "HeunDiscrete": ("HeunDiscreteScheduler", {}),
    "KarrasDPM": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "K_EULER_ANCESTRAL": ("EulerAncestralDiscreteScheduler", {}),
    "K_EULER": ("EulerDiscreteScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
}


def kiln_config(folder: Path) -> dict[str, Any]:
    """The model's kiln.json (serving defaults), empty when the folder has none."""
    path = Path(folder) / "kiln.json"
    return dict(json.loads(path.read_text())) if path.is_file() else {}


class Sampler:
    """A loaded model folder that turns prompts into RGB uint8 arrays."""

    def __init__(self, folder: Path) -> None:
        from diffusers import StableDiffusionXLPipeline

        self.folder = Path(folder)
        self.defaults = kiln_config(self.folder)
        self.pipe = StableDiffusionXLPipeline.from_pretrained(
            str(self.folder), torch_dtype=torch.float32, add_watermarker=False
        )
        self.pipe.set_progress_bar_config(disable=True)
        self._base_scheduler_config = dict(self.pipe.scheduler.config)

    def set_scheduler(self, name: str) -> None:
        """Switch to a scheduler by its Replicate name (ValueError naming the choices)."""
        import diffusers

        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
        class_name, extra = SCHEDULERS[name]
        cls = getattr(diffusers, class_name)
        self.pipe.scheduler = cls.from_config({**self._base_scheduler_config, **extra})

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        size: int | None = None,
    ) -> list[np.ndarray]:
        """One image per (prompt, seed) pair, at the model's defaults unless overridden.

        Each image's starting noise depends only on its seed, so batching does not change
        results beyond float rounding.
        """
        if len(prompts) != len(seeds):
            raise ValueError("prompts and seeds must have the same length")
        self.set_scheduler(scheduler or str(self.defaults.get("default_scheduler", "K_EULER")))
        side = size or int(self.defaults.get("default_width", 64))
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        with torch.no_grad():
            result = self.pipe(
                prompt=list(prompts),
                num_inference_steps=steps
                or int(self.defaults.get("default_num_inference_steps", 20)),
                guidance_scale=(
                    guidance_scale
                    if guidance_scale is not None
                    else float(self.defaults.get("default_guidance_scale", 5.0))
                ),
                width=side,
                height=side,
                generator=generators,
                output_type="np",
            )
        images = np.asarray(result.images)
        return [np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8) for image in images]
