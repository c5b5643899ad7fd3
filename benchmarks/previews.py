"""Step previews: the linear latent-to-RGB map vs the learned preview decoder, in-process.

    .venv/bin/python benchmarks/previews.py [--model models/kiln-shapes] [--threads 1]

Cost: the median seconds of one denoising step at the model's defaults (one request, UNet +
scheduler) and of one preview of that step's predicted clean latents by each method, up to
uint8 pixels on the host, through the pipeline's own preview path (`preview_pixels`: the
linear map, or the preview-decoder engine), as a share of the step. Resizing and encoding
the preview cost the same for both methods and are left out.

Closeness: for `--prompts` balanced prompts x `--seeds` seeds, how far the last step's
preview is from the final image: the largest channel difference of the mean background and
shape colours (0-255 levels) and the PSNR at preview size (the image size on kiln-shapes).
The decoder is loaded from `<model>/preview_decoder/` directly.
`--write-results` replaces this benchmark's section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from results_file import cpu_name, publish

from kiln_server.pipeline.params import GenerationParams
from kiln_training.dataset import caption, prompt_set
from kiln_training.preview_decoder import (
    SUBFOLDER,
    Closeness,
    compare_previews,
    load_decoder,
    load_pipeline,
)

SECTION = "## Step previews: linear map vs learned decoder (benchmarks/previews.py)"


def measure_cost(pipeline: object, repeats: int) -> dict[str, float]:
    """Median seconds of a step and of each method's preview of that step's prediction."""
    defaults = pipeline.files.kiln_config  # type: ignore[attr-defined]
    steps, linear, learned = [], [], []
    for repeat in range(repeats + 1):
        state = pipeline.prepare(  # type: ignore[attr-defined]
            GenerationParams(
                prompt="a red circle on a blue background",
                width=int(defaults.get("default_width", 64)),
                height=int(defaults.get("default_height", 64)),
                num_inference_steps=int(defaults.get("default_num_inference_steps", 20)),
                guidance_scale=float(defaults.get("default_guidance_scale", 5.0)),
                scheduler=str(defaults.get("default_scheduler", "K_EULER")),
                seed=repeat,
            )
        )
        with torch.inference_mode():
            while not state.finished:
                began = time.perf_counter()
                pipeline.denoise_step([state])  # type: ignore[attr-defined]
                step = time.perf_counter() - began
                # The served path: the pipeline's preview engine for each method, up to
                # uint8 pixels on the host.
                began = time.perf_counter()
                pipeline.preview_pixels(state, "latent_rgb").cpu().numpy()  # type: ignore[attr-defined]
                linear_seconds = time.perf_counter() - began
                began = time.perf_counter()
                pipeline.preview_pixels(state, "decoder").cpu().numpy()  # type: ignore[attr-defined]
                learned_seconds = time.perf_counter() - began
                if repeat:  # the first generation warms up
                    steps.append(step)
                    linear.append(linear_seconds)
                    learned.append(learned_seconds)
    return {
        "step": statistics.median(steps),
        "linear": statistics.median(linear),
        "decoder": statistics.median(learned),
        "samples": float(len(steps)),
    }


def closeness_row(name: str, value: Closeness) -> str:
    """One Markdown table row of a method's mean closeness."""
    return f"| {name} | {value.background:.1f} | {value.shape:.1f} | {value.psnr:.2f} |"


def preview_strip(pipeline: Any, prompt: str, seed: int, steps: Sequence[int]) -> Any:
    """A PIL image: a row of previews per method at `steps` (1-based), each ending with
    the final image, drawn through the pipeline's own preview path (what the server sends).
    """
    from PIL import Image

    params = GenerationParams(
        prompt=prompt,
        seed=seed,
        width=int(pipeline.files.kiln_config.get("default_width", 64)),
        height=int(pipeline.files.kiln_config.get("default_height", 64)),
        num_inference_steps=int(pipeline.files.kiln_config.get("default_num_inference_steps", 20)),
        guidance_scale=float(pipeline.files.kiln_config.get("default_guidance_scale", 5.0)),
    )
    methods = pipeline.limits.preview_methods
    rows: dict[str, list[Any]] = {method: [] for method in methods}
    state = pipeline.prepare(params)
    while not state.finished:
        pipeline.denoise_step([state])
        if state.step_index in steps:
            for method in methods:
                pixels = pipeline.preview_pixels(state, method).cpu().numpy()
                tile = Image.fromarray(pixels).resize((params.width, params.height))
                rows[method].append(tile)
    final = Image.fromarray(pipeline.decode(state)[0].cpu().numpy())
    gap = 4
    columns = len(steps) + 1
    strip = Image.new(
        "RGB",
        (columns * (params.width + gap) - gap, len(methods) * (params.height + gap) - gap),
        "white",
    )
    for row, method in enumerate(methods):
        for column, tile in enumerate([*rows[method], final]):
            strip.paste(tile, (column * (params.width + gap), row * (params.height + gap)))
    return strip.resize((strip.width * 3, strip.height * 3), Image.Resampling.NEAREST)


def main() -> int:
    """Parse flags, measure, print and optionally record the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/kiln-shapes"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--repeats", type=int, default=5, help="generations timed per method")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--write-results", action="store_true")
    parser.add_argument(
        "--strip",
        type=Path,
        help="write a PNG of previews at steps 2, 5, 10, 15 next to the final image, one row "
        "per method (the README's picture), and exit",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    pipeline = load_pipeline(args.model)
    if args.strip is not None:
        strip = preview_strip(
            pipeline, "a yellow triangle on a purple background", 3, (2, 5, 10, 15)
        )
        args.strip.parent.mkdir(parents=True, exist_ok=True)
        strip.save(args.strip)
        print(f"wrote {args.strip}")
        return 0
    decoder = load_decoder(args.model / SUBFOLDER)
    parameters = sum(p.numel() for p in decoder.decoder.parameters())
    cost = measure_cost(pipeline, args.repeats)

    scenes = prompt_set(args.prompts)
    prompts = [caption(scene) for scene in scenes for _ in range(args.seeds)]
    seeds = [i % args.seeds for i in range(len(prompts))]
    comparison = compare_previews(pipeline, decoder, prompts, seeds)

    defaults = pipeline.files.kiln_config
    width = int(defaults.get("default_width", 64))
    height = int(defaults.get("default_height", 64))
    step_ms = cost["step"] * 1000
    command = " ".join(sys.argv[1:])
    section = "\n".join(
        [
            SECTION,
            "",
            f"Machine: {platform.machine()}, {cpu_name()}, {os.cpu_count()} cores (shared), "
            f"Python {platform.python_version()}; measured {time.strftime('%Y-%m-%d')}.",
            f"Command: `.venv/bin/python benchmarks/previews.py {command}`",
            f"Model `{args.model.name}` on `torch`, {args.threads} thread(s): {width}x{height}, "
            f"{defaults.get('default_num_inference_steps')} steps, guidance "
            f"{defaults.get('default_guidance_scale')}, {defaults.get('default_scheduler')}. "
            f"Decoder: AutoencoderTiny, {parameters:,} decoder parameters.",
            "",
            f"Cost per step (median of {int(cost['samples'])} steps; preview = the predicted "
            "clean latents to uint8 pixels on the host, before resize and encode):",
            "",
            "| method | preview ms | step ms | preview / step |",
            "|---|---:|---:|---:|",
            f"| linear latent-to-RGB map | {cost['linear'] * 1000:.3f} | {step_ms:.2f} "
            f"| {cost['linear'] / cost['step'] * 100:.1f}% |",
            f"| learned decoder | {cost['decoder'] * 1000:.3f} | {step_ms:.2f} "
            f"| {cost['decoder'] / cost['step'] * 100:.1f}% |",
            "",
            f"Closeness of the last step's preview to the final image ({args.prompts} prompts "
            f"x {args.seeds} seeds = {comparison.images} images; colour errors are the largest "
            "channel difference of the mean colour, in levels of 255, lower is better; PSNR at "
            f"preview size {width}x{height}, the linear map's 8x8 pixels scaled up bilinearly "
            "as the server does):",
            "",
            "| method | background error | shape error | PSNR dB |",
            "|---|---:|---:|---:|",
            closeness_row("linear latent-to-RGB map", comparison.linear),
            closeness_row("learned decoder", comparison.decoder),
            "",
            "Goals (issue 16): the learned decoder's background within 12 levels, its preview "
            "at most 10% of a step.",
            "",
        ]
    )
    publish(SECTION, section, args.write_results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
