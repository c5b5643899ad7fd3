"""Per-step, per-image and preview cost of one model, in-process.

    .venv/bin/python benchmarks/pipeline.py [--model kiln-tiny-sdxl] [--backend torch]

Runs the default request of the model (its default size, steps, guidance and scheduler)
`--repeats` times after a warm-up and reports the median seconds per image, per denoising
step (UNet + scheduler), for the VAE decode, and for one preview (latent-to-RGB map,
resize and JPEG encode), with the preview's cost as a share of a step.
`--write-results` replaces this benchmark's section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from results_file import publish

from kiln_server.engines.loading import load_engine_set, resolve_backend
from kiln_server.models.loader import read_model_files
from kiln_server.models.registry import (
    builtin_model_path,
    default_builtin_name,
    default_cache_dir,
    make_spec,
)
from kiln_server.pipeline.params import GenerationParams, PreviewParams
from kiln_server.pipeline.sdxl import SDXLPipeline

SECTION = "## Pipeline cost per step and per image (benchmarks/pipeline.py)"


def measure(pipeline: SDXLPipeline, params: GenerationParams) -> dict[str, float]:
    """Seconds of one full generation, split into steps, decode and previews."""
    started = time.perf_counter()
    state = pipeline.prepare(params)
    prepare = time.perf_counter() - started
    steps, previews = [], []
    while not state.finished:
        begin = time.perf_counter()
        pipeline.denoise_step([state])
        steps.append(time.perf_counter() - begin)
        begin = time.perf_counter()
        pipeline.preview(state, params.preview)
        previews.append(time.perf_counter() - begin)
    begin = time.perf_counter()
    pipeline.decode(state)
    decode = time.perf_counter() - begin
    return {
        "image": prepare + sum(steps) + decode,
        "step": statistics.median(steps),
        "decode": decode,
        "preview": statistics.median(previews),
        "steps": float(len(steps)),
    }


def main() -> int:
    """Parse flags, measure, print and optionally record the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=default_builtin_name(), help="built-in model name")
    parser.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"))
    parser.add_argument("--engines", type=Path, help="engines folder (one subfolder per model)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="engine threads; 0 = all cores")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()

    spec = make_spec(args.model, builtin_model_path(args.model, default_cache_dir()), {})
    files = read_model_files(spec.path)
    engines_dir = args.engines / spec.name if args.engines else None
    backend = resolve_backend(args.backend, engines_dir)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    engines = load_engine_set(backend, files, engines_dir, threads=threads)
    pipeline = SDXLPipeline(files, engines)
    params = spec.default_request(
        "a red circle on a blue background",
        seed=1,
        preview=PreviewParams(every_n_steps=1, max_size=256),
    )
    measure(pipeline, params)  # warm-up
    runs = [measure(pipeline, params) for _ in range(args.repeats)]
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    section = "\n".join(
        [
            SECTION,
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}; measured {time.strftime('%Y-%m-%d')}.",
            f"Command: `.venv/bin/python benchmarks/pipeline.py {' '.join(sys.argv[1:])}`",
            f"Model `{spec.name}` on `{backend}`: {params.width}x{params.height}, "
            f"{params.num_inference_steps} steps ({int(median['steps'])} UNet calls), "
            f"guidance {params.guidance_scale}, {params.scheduler}, {threads} engine "
            f"thread(s); median of {args.repeats}.",
            "",
            "| per image s | per step ms | VAE decode ms | preview ms | preview / step |",
            "|---:|---:|---:|---:|---:|",
            f"| {median['image']:.3f} | {median['step'] * 1000:.2f} "
            f"| {median['decode'] * 1000:.2f} | {median['preview'] * 1000:.2f} "
            f"| {median['preview'] / median['step'] * 100:.1f}% |",
            "",
        ]
    )
    publish(SECTION, section, args.write_results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
