"""Generate images from a FLUX model folder through Kiln's own FluxPipeline, and judge them.

`FluxSampler` is the FLUX counterpart of sampling.KilnSampler (same `Sampler` protocol, so
benchmarks/adherence.py's `measure` takes it as it is): Kiln's FluxPipeline on the torch
or onnxruntime backend, every request advanced together, one transformer call per step;
`FluxDiffusersSampler` runs diffusers' FluxPipeline on the same folder. Unset settings
come from the model's kiln.json. On a model without a guidance embedding a guidance scale
above 1 is true classifier-free guidance against kiln.json's `default_negative_prompt`
(the empty prompt), as the server serves it. `flux_adherence` scores a prompt set.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln_training.dataset import caption, prompt_set
from kiln_training.evaluate import Adherence, Score, adherence, score
from kiln_training.sampling import RequestSettings

FLUX_DEFAULT_SCHEDULER = "FLOW_MATCH_EULER"


class FluxSampler:
    """Kiln's FluxPipeline over a FLUX model folder, fp32 on the CPU: the torch backend, or
    onnxruntime over the graphs in `engines_dir` (built from this folder by
    `kiln_training.sampling.build_onnx_engines`)."""

    def __init__(self, folder: Path, engines_dir: Path | None = None) -> None:
        from kiln_server.engines.loading import load_flux_engine_set
        from kiln_server.models.flux_loader import read_flux_model_files
        from kiln_server.pipeline.flux import FluxPipeline

        self.folder = Path(folder)
        files = read_flux_model_files(self.folder)
        self.defaults = flux_defaults(files)
        self.backend = "torch" if engines_dir is None else "onnxruntime"
        engines = load_flux_engine_set(self.backend, files, engines_dir)
        self.pipeline = FluxPipeline(files, engines)

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
        """One RGB uint8 image (H, W, 3) per (prompt, seed) pair, each equal (up to float
        rounding) to what a lone request with that prompt and seed gets."""
        requests = flux_requests(
            self.defaults,
            prompts,
            seeds,
            RequestSettings(self.defaults, steps, guidance_scale, scheduler, size),
        )
        with torch.no_grad():
            states = [self.pipeline.prepare(params) for params in requests]
            while not all(state.finished for state in states):
                self.pipeline.denoise_step([s for s in states if not s.finished])
            return [self.pipeline.decode(state)[0].cpu().numpy() for state in states]


class FluxDiffusersSampler:
    """diffusers' own FluxPipeline over the same folder (kiln_server.pipeline.flux_reference),
    one request at a time: the reference Kiln's rows are compared with."""

    def __init__(self, folder: Path) -> None:
        from kiln_server.models.flux_loader import read_flux_model_files
        from kiln_server.pipeline.flux_reference import FluxDiffusersReference

        files = read_flux_model_files(Path(folder))
        self.defaults = flux_defaults(files)
        self.reference = FluxDiffusersReference(Path(folder), files.max_sequence_length)

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
        settings = RequestSettings(self.defaults, steps, guidance_scale, scheduler, size)
        requests = flux_requests(self.defaults, prompts, seeds, settings)
        return [self.reference.generate(params)[0] for params in requests]


def flux_defaults(files: Any) -> dict[str, Any]:
    """A FLUX folder's request defaults: its kiln.json over the family's scheduler."""
    return {"default_scheduler": FLUX_DEFAULT_SCHEDULER, **files.kiln_config}


def flux_requests(
    defaults: dict[str, Any],
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: RequestSettings,
) -> list[Any]:
    """One GenerationParams per (prompt, seed) pair at `settings`, with the model's
    `default_negative_prompt` (kiln.json), as the server fills it in."""
    from kiln_server.pipeline.params import GenerationParams

    if len(prompts) != len(seeds):
        raise ValueError(
            f"prompts and seeds must have the same length, got {len(prompts)} and {len(seeds)}"
        )
    return [
        GenerationParams(
            prompt=prompt,
            negative_prompt=defaults.get("default_negative_prompt"),
            width=settings.size,
            height=settings.size,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            scheduler=settings.scheduler,
            seed=int(seed),
        )
        for prompt, seed in zip(prompts, seeds, strict=True)
    ]


def flux_adherence(
    sampler: FluxSampler,
    *,
    prompts: int = 48,
    seeds: int = 2,
    steps: int | None = None,
    guidance_scale: float | None = None,
    batch: int = 32,
) -> Adherence:
    """Judge `prompts` x `seeds` images of the fixed prompt set (dataset.prompt_set; image
    seeds 1000·(k+1) + i as benchmarks/adherence.py draws them) at the given settings (None:
    the model's defaults)."""
    scenes = prompt_set(prompts)
    jobs = [(scene, 1000 * (k + 1) + i) for k in range(seeds) for i, scene in enumerate(scenes)]
    scores: list[Score] = []
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        images = sampler.generate(
            [caption(scene) for scene, _ in chunk],
            [seed for _, seed in chunk],
            steps=steps,
            guidance_scale=guidance_scale,
        )
        scores.extend(score(image, scene) for image, (scene, _) in zip(images, chunk, strict=True))
    return adherence(scores)
