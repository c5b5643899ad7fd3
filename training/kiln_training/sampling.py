"""Generate images from a model folder for training checks, tests and benchmarks.

`KilnSampler` runs Kiln's own serving pipeline (`kiln_server.pipeline.SDXLPipeline`) on the
torch or onnxruntime backend, batching many prompts into each UNet call the way the server's
batcher does. `DiffusersSampler` runs diffusers' StableDiffusionXLPipeline, the reference
the Kiln pipeline is tested against. Both take Kiln's scheduler names (Replicate's) and
fill unset settings from the model's kiln.json defaults; both return RGB uint8 arrays.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch


def kiln_config(folder: Path) -> dict[str, Any]:
    """The model's kiln.json (serving defaults), empty when the folder has none."""
    path = Path(folder) / "kiln.json"
    return dict(json.loads(path.read_text())) if path.is_file() else {}


class Sampler(Protocol):
    """Anything that turns (prompt, seed) pairs into images with given settings."""

    defaults: dict[str, Any]

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
        """One RGB uint8 image (H, W, 3) per (prompt, seed) pair."""
        ...


class RequestSettings:
    """Request settings with the model's defaults filled in."""

    def __init__(
        self,
        defaults: dict[str, Any],
        steps: int | None,
        guidance_scale: float | None,
        scheduler: str | None,
        size: int | None,
    ) -> None:
        self.steps = steps or int(defaults.get("default_num_inference_steps", 20))
        self.guidance_scale = (
            guidance_scale
            if guidance_scale is not None
            else float(defaults.get("default_guidance_scale", 5.0))
        )
        self.scheduler = scheduler or str(defaults.get("default_scheduler", "K_EULER"))
        self.size = size or int(defaults.get("default_width", 64))


class KilnSampler:
    """Kiln's SDXL pipeline over a model folder on the torch or onnxruntime backend.

    For onnxruntime, `engines_dir` must hold engines built from this folder (see
    `build_onnx_engines`).
    """

    def __init__(
        self, folder: Path, backend: str = "torch", engines_dir: Path | None = None
    ) -> None:
        from kiln_server.engines.loading import load_engine_set
        from kiln_server.models.loader import read_model_files
        from kiln_server.pipeline.sdxl import SDXLPipeline

        self.folder = Path(folder)
        self.backend = backend
        files = read_model_files(self.folder)
        self.defaults = dict(files.kiln_config)
        self.pipeline = SDXLPipeline(files, load_engine_set(backend, files, engines_dir))

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
        """One image per (prompt, seed), all requests advanced together, one UNet call a step.

        Each image equals what a lone request with that prompt and seed gets (up to float
        rounding), as batching in Kiln's pipeline keeps every request's state separate.
        """
        from kiln_server.pipeline.params import GenerationParams

        if len(prompts) != len(seeds):
            raise ValueError("prompts and seeds must have the same length")
        settings = RequestSettings(self.defaults, steps, guidance_scale, scheduler, size)
        return self.run(
            [
                GenerationParams(
                    prompt=prompt,
                    width=settings.size,
                    height=settings.size,
                    num_inference_steps=settings.steps,
                    guidance_scale=settings.guidance_scale,
                    scheduler=settings.scheduler,
                    seed=int(seed),
                )
                for prompt, seed in zip(prompts, seeds, strict=True)
            ]
        )

    def run(self, requests: Sequence[Any]) -> list[np.ndarray]:
        """The first image of each request (GenerationParams: text-to-image, img2img or
        inpainting), all advanced together: every step one UNet call for the requests that
        still have steps, as the server's batcher shares calls between requests that enter
        at different timesteps. Requests must share one image size."""
        with torch.no_grad():
            states = [self.pipeline.prepare(params) for params in requests]
            while not all(state.finished for state in states):
                self.pipeline.denoise_step([s for s in states if not s.finished])
            return [self.pipeline.decode(state)[0].cpu().numpy() for state in states]


class DiffusersSampler:
    """diffusers' StableDiffusionXLPipeline over a model folder (the reference)."""

    def __init__(self, folder: Path) -> None:
        from diffusers import StableDiffusionXLPipeline

        self.folder = Path(folder)
        self.defaults = kiln_config(self.folder)
        self.pipe = StableDiffusionXLPipeline.from_pretrained(
            str(self.folder), dtype=torch.float32, add_watermarker=False
        )
        self.pipe.set_progress_bar_config(disable=True)
        self._scheduler_config = dict(self.pipe.scheduler.config)

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
        """One image per (prompt, seed) pair; each image's noise depends only on its seed."""
        from kiln_server.pipeline.schedulers import make_scheduler

        if len(prompts) != len(seeds):
            raise ValueError("prompts and seeds must have the same length")
        settings = RequestSettings(self.defaults, steps, guidance_scale, scheduler, size)
        self.pipe.scheduler = make_scheduler(settings.scheduler, self._scheduler_config)
        with torch.no_grad():
            result = self.pipe(
                prompt=list(prompts),
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance_scale,
                width=settings.size,
                height=settings.size,
                generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
                output_type="np",
            )
        images = np.asarray(result.images)
        return [np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8) for image in images]


class DiffusersImageSampler:
    """diffusers' SDXL img2img and inpaint pipelines over a model folder (the reference
    for image-conditioned requests), through `kiln_server.pipeline.reference`."""

    def __init__(self, folder: Path) -> None:
        from kiln_server.models.loader import load_modules, read_model_files
        from kiln_server.pipeline.reference import DiffusersReference

        files = read_model_files(Path(folder))
        self.defaults = dict(files.kiln_config)
        self.reference = DiffusersReference(files, load_modules(Path(folder)))

    def run(self, requests: Sequence[Any]) -> list[np.ndarray]:
        """The first image of each request (GenerationParams), one request at a time."""
        return [self.reference.generate(params)[0] for params in requests]


def build_onnx_engines(folder: Path, engines_dir: Path, name: str | None = None) -> Path:
    """Export the folder's components to ONNX engines in `engines_dir` (Kiln's build path)."""
    from kiln_build.build import BuildOptions, run_build

    run_build(
        BuildOptions(Path(folder), Path(engines_dir), model_name=name, progress=False),
        say=lambda text: None,
    )
    return Path(engines_dir)
