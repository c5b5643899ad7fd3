"""Cost of image conditioning: img2img and inpainting against text-to-image, per image.

    .venv/bin/python benchmarks/image_conditioning.py [--models kiln-shapes kiln-tiny-sdxl]
        [--backends torch onnxruntime] [--sizes 64 256] [--repeats 10] [--threads 1]
        [--write-results]

For each model, backend and size, runs one request (one image, the model's default steps,
guidance and scheduler) of each kind, interleaved `--repeats` times after a warm-up round,
and reports the median seconds per image in the engine (prepare: prompt encoding, VAE
encoder, initial latents; the denoising steps; the VAE decode), the ratio to text-to-image
at the same size and steps, and the VAE encoder's milliseconds and share of the image's
time. Kinds: text-to-image; img2img at strength 0.3, 0.6 and 1.0; inpainting (a plain
UNet: the re-noised photo blended in outside the mask after every step) at the default
strength 0.8 and at 1.0. A strength s runs int(steps x s) UNet steps. The API process's
own work for a photo request (PNG decode of photo and mask, framing, and the overlay that
keeps the unmasked pixels) is timed separately, since it runs beside the engine, not in it.
The ONNX engines are built fresh into a temporary folder (`kiln build-engines --format
onnx`). `--write-results` replaces this benchmark's section of benchmarks/RESULTS.md (or
of `--results-file`).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from results_file import RESULTS, cpu_name, write_section

from kiln_server.engines.base import Engine, EngineSet
from kiln_server.engines.loading import load_engine_set
from kiln_server.models.loader import read_model_files
from kiln_server.models.registry import (
    ModelSpec,
    builtin_model_path,
    default_builtin_name,
    default_cache_dir,
    make_spec,
)
from kiln_server.pipeline.params import GenerationParams, ImageConditioning
from kiln_server.pipeline.sdxl import SDXLPipeline

SECTION = (
    "## Image conditioning: cost per image against text-to-image (benchmarks/image_conditioning.py)"
)
PROMPT = "a red circle on a yellow background"


@dataclass(frozen=True)
class Kind:
    """One kind of request: img2img at `strength`, inpainting with `mask`, or neither."""

    name: str
    strength: float | None = None
    inpaint: bool = False


KINDS = (
    Kind("text-to-image"),
    Kind("img2img", 0.3),
    Kind("img2img", 0.6),
    Kind("img2img", 1.0),
    Kind("inpainting", 0.8, inpaint=True),
    Kind("inpainting", 1.0, inpaint=True),
)


class TimedEngine:
    """An engine that adds the seconds of each call to `seconds` (synchronising CUDA)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.spec = engine.spec
        self.max_batch = engine.max_batch
        self.seconds = 0.0

    def infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        began = time.perf_counter()
        outputs = self.engine.infer(inputs)
        if any(t.is_cuda for t in outputs.values()):
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - began
        return outputs


def product_photo(size: int) -> tuple[np.ndarray, np.ndarray]:
    """A kiln-shapes style photo (red circle on blue) and its background mask (1 = repaint)."""
    from kiln_training.dataset import Scene, render_scene, shape_mask

    scene = Scene(shape="circle", colour="red", background="blue", extent=0.5)
    photo = render_scene(scene, size)
    product = shape_mask("circle", size, 0.5, 0.5, 0.5)
    return photo, np.where(product, 0.0, 1.0).astype(np.float32)


def request(spec: ModelSpec, size: int, kind: Kind, steps: int | None) -> GenerationParams:
    """The model's default request at `size` for `kind` (seed 1, one image)."""
    params = spec.default_request(PROMPT, seed=1, width=size, height=size)
    if steps is not None:
        params = replace(params, num_inference_steps=steps)
    if kind.strength is None:
        return params
    photo, mask = product_photo(size)
    conditioning = ImageConditioning(photo, kind.strength, mask if kind.inpaint else None)
    return replace(params, image=conditioning)


def measure(
    pipeline: SDXLPipeline, encoder: TimedEngine | None, params: GenerationParams
) -> dict[str, float]:
    """Seconds of one request in the engine, split into prepare, steps, decode, encoder."""
    if encoder is not None:
        encoder.seconds = 0.0
    began = time.perf_counter()
    state = pipeline.prepare(params)
    prepared = time.perf_counter()
    steps = 0
    while not state.finished:
        pipeline.denoise_step([state])
        steps += 1
    stepped = time.perf_counter()
    pipeline.decode(state).cpu()
    done = time.perf_counter()
    return {
        "image": done - began,
        "prepare": prepared - began,
        "steps": stepped - prepared,
        "decode": done - stepped,
        "encoder": encoder.seconds if encoder is not None else 0.0,
        "unet_steps": float(steps),
    }


def api_side(size: int, repeats: int) -> float:
    """Median seconds of the API process's work for an inpainting photo: decode the PNG
    photo and mask, frame them, and put the photo's unmasked pixels back over a result."""
    from kiln_server.image_inputs import (
        ImageInputLimits,
        apply_overlay,
        decode_image,
        frame_inputs,
    )
    from kiln_training.image_tasks import png_bytes

    photo, mask = product_photo(size)
    photo_png = png_bytes(photo)
    mask_png = png_bytes((mask * 255).astype(np.uint8))
    limits = ImageInputLimits()
    times = []
    for _ in range(repeats + 1):
        began = time.perf_counter()
        framed = frame_inputs(
            decode_image(photo_png, "image", limits),
            decode_image(mask_png, "mask", limits),
            width=size,
            height=size,
            strength=0.8,
            keep_unmasked=True,
            crop_padding=None,
        )
        assert framed.overlay is not None
        apply_overlay(photo, framed.overlay)
        times.append(time.perf_counter() - began)
    return statistics.median(times[1:])


@dataclass
class Table:
    """Median measurements of every kind for one model, backend and size."""

    model: str
    backend: str
    size: int
    steps: int
    guidance: float
    scheduler: str
    medians: dict[str, dict[str, float]]
    api_seconds: float


def label(kind: Kind) -> str:
    """The kind's row label."""
    if kind.strength is None:
        return kind.name
    return f"{kind.name} {kind.strength:g}"


def measure_table(
    spec: ModelSpec,
    engines: EngineSet,
    size: int,
    repeats: int,
    steps: int | None,
) -> Table:
    """Every kind at `size`, interleaved (each round in a rotated order), median of
    `repeats` after one warm-up round."""
    files = read_model_files(spec.path)
    encoder = None
    if engines.vae_encoder is not None:
        encoder = TimedEngine(engines.vae_encoder)
        engines.vae_encoder = encoder
    pipeline = SDXLPipeline(files, engines)
    requests = {label(kind): request(spec, size, kind, steps) for kind in KINDS}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in requests}
    names = list(requests)
    with torch.no_grad():
        for round_index in range(repeats + 1):
            # Each round starts at another kind, so no kind always runs first.
            start = round_index % len(names)
            for name in names[start:] + names[:start]:
                result = measure(pipeline, encoder, requests[name])
                if round_index:
                    runs[name].append(result)
    medians = {
        name: {key: statistics.median(run[key] for run in results) for key in results[0]}
        for name, results in runs.items()
    }
    first = requests["text-to-image"]
    return Table(
        model=spec.name,
        backend=engines.backend,
        size=size,
        steps=first.num_inference_steps,
        guidance=first.guidance_scale,
        scheduler=first.scheduler,
        medians=medians,
        api_seconds=api_side(size, repeats),
    )


def render(tables: list[Table], args: argparse.Namespace, loads: tuple[float, float]) -> str:
    """The Markdown section: one table per model, backend and size."""
    lines = [
        SECTION,
        "",
        f"Machine: {platform.machine()} ({cpu_name()}), {os.cpu_count()} cores (shared), "
        f"torch {torch.__version__}, Python {platform.python_version()}; measured "
        f"{time.strftime('%Y-%m-%d')}.",
        f"Command: `.venv/bin/python benchmarks/image_conditioning.py {' '.join(args.argv)}`",
        f"One request, one image, seed 1, the prompt {PROMPT!r}; {args.threads} engine "
        f"thread(s); median of {args.repeats} interleaved rounds (each starting at another "
        "kind) after a warm-up round. "
        "Engine seconds per image: prepare (prompt encoding from the cache, VAE encoder, "
        "initial latents) + denoising steps + VAE decode, as the engine core runs them. The "
        "photo is a rendered 'red circle on a blue background' at the request's size; "
        "inpainting keeps the circle (its mask repaints the background). 1-minute load "
        f"average {loads[0]:.1f} before, {loads[1]:.1f} after: on this shared machine "
        "absolute times swing with the load; the interleaved ratios are the comparable figure.",
    ]
    for table in tables:
        base = table.medians["text-to-image"]["image"]
        lines += [
            "",
            f"**{table.model}, {table.backend}, {table.size}x{table.size}**, "
            f"{table.steps} steps, guidance {table.guidance:g}, {table.scheduler}. API "
            f"process per photo request (PNG decode of photo and mask, framing, overlay): "
            f"{table.api_seconds * 1000:.2f} ms.",
            "",
            "| request | UNet steps | s / image | vs text-to-image | prepare ms "
            "| VAE encoder ms | encoder share | steps s | VAE decode ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, m in table.medians.items():
            encoder = m["encoder"]
            share = f"{encoder / m['image']:.1%}" if encoder else "-"
            lines.append(
                f"| {name} | {int(m['unet_steps'])} | {m['image']:.4f} "
                f"| {m['image'] / base:.2f}x | {m['prepare'] * 1000:.2f} "
                f"| {encoder * 1000:.2f} | {share} | {m['steps']:.4f} "
                f"| {m['decode'] * 1000:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Parse flags, measure every model, backend and size, print and optionally record."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=[default_builtin_name()])
    parser.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"])
    parser.add_argument("--sizes", nargs="+", type=int, help="default: each model's default")
    parser.add_argument("--steps", type=int, help="default: each model's default steps")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="engine (torch/ORT) threads")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--write-results", action="store_true")
    parser.add_argument("--results-file", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    for backend in args.backends:
        if backend not in ("torch", "onnxruntime"):
            parser.error(f"--backends: {backend!r} is not torch or onnxruntime")
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    cache_dir = args.cache_dir or default_cache_dir()

    from kiln_build.build import BuildOptions, run_build

    loads = [os.getloadavg()[0]]
    tables = []
    with tempfile.TemporaryDirectory(prefix="kiln-image-bench-") as tmp:
        for name in args.models:
            spec = make_spec(name, builtin_model_path(name, cache_dir), {})
            files = read_model_files(spec.path)
            engines_dir = Path(tmp) / spec.name
            if "onnxruntime" in args.backends:
                run_build(
                    BuildOptions(spec.path, engines_dir, model_name=spec.name, progress=False),
                    say=lambda text: None,
                )
            for backend in args.backends:
                for size in args.sizes or [spec.default_width]:
                    engines = load_engine_set(
                        backend,
                        files,
                        engines_dir if backend != "torch" else None,
                        threads=args.threads,
                    )
                    table = measure_table(spec, engines, size, args.repeats, args.steps)
                    tables.append(table)
                    t2i = table.medians["text-to-image"]["image"]
                    print(
                        f"{spec.name} {backend} {size}: text-to-image {t2i:.4f} s; "
                        + ", ".join(
                            f"{k} {v['image'] / t2i:.2f}x"
                            for k, v in table.medians.items()
                            if k != "text-to-image"
                        ),
                        file=sys.stderr,
                        flush=True,
                    )
    loads.append(os.getloadavg()[0])
    section = render(tables, args, (loads[0], loads[1]))
    print(section)
    if args.write_results:
        write_section(SECTION, section, args.results_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
