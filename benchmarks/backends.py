"""Backends side by side: diffusers eager vs Kiln torch vs Kiln onnxruntime, one model.

    .venv/bin/python benchmarks/backends.py [--model NAME] [--repeats 5] [--write-results]

Runs the model's default request (its default size, steps, guidance and scheduler; one
image, fixed seed) through diffusers' own StableDiffusionXLPipeline in eager torch, Kiln's
pipeline on the torch backend, and Kiln's pipeline on the onnxruntime backend, interleaved
so drift hits all three alike, and reports the median seconds per image, the ratios, and
how close the images are (PSNR). The ONNX engines are built fresh into a temporary folder
(the `kiln build-engines --format onnx` path) so export and validation time and engine
sizes are measured too. A last section estimates SDXL at 1024x1024 on an H100 from FLOPs
counted on the real SDXL architecture (meta tensors: no weights, no compute).
`--write-results` replaces this benchmark's section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flops import count_flops, unet_flops
from results_file import cpu_name, publish

from kiln_build.build import BuildOptions, run_build
from kiln_server.engines.loading import load_engine_set
from kiln_server.engines.torch_engine import load_torch_engines
from kiln_server.models.loader import load_modules, read_model_files
from kiln_server.models.registry import (
    builtin_model_path,
    default_builtin_name,
    default_cache_dir,
    make_spec,
)
from kiln_server.models.sdxl_base_arch import SDXL_BASE
from kiln_server.pipeline.params import GenerationParams
from kiln_server.pipeline.reference import DiffusersReference
from kiln_server.pipeline.sdxl import SDXLPipeline

SECTION = "## Backends: diffusers vs Kiln torch vs Kiln onnxruntime (benchmarks/backends.py)"

# NVIDIA H100 SXM5 datasheet peaks, dense (no sparsity): FP16/BF16 and TF32 tensor cores.
H100_FP16_TFLOPS = 989.4
H100_TF32_TFLOPS = 494.7


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two uint8 images in dB (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def diffusers_runner(files: Any, modules: Any) -> Callable[[GenerationParams], np.ndarray]:
    """diffusers' StableDiffusionXLPipeline over the model's components, as users run it."""
    reference = DiffusersReference(files, modules)
    return lambda params: reference.generate(params)[0]


def kiln_runner(pipeline: SDXLPipeline) -> Callable[[GenerationParams], np.ndarray]:
    """Kiln's pipeline, one request start to finish."""
    return lambda params: pipeline.generate(params)[0]


def sdxl_flops() -> dict[str, float]:
    """FLOPs of SDXL base's components at 1024x1024, one sample, counted on meta tensors."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    counts: dict[str, float] = {"unet": unet_flops(SDXL_BASE.unet, 1, 128, 128)}
    with torch.device("meta"):
        vae: Any = AutoencoderKL.from_config(SDXL_BASE.vae)
        counts["vae_decoder"] = count_flops(lambda: vae.decode(torch.randn(1, 4, 128, 128)))
        text = 0.0
        for config in (SDXL_BASE.text_encoder, SDXL_BASE.text_encoder_2):
            model = CLIPTextModel(CLIPTextConfig(**config))
            text += count_flops(partial(model, torch.zeros(1, 77, dtype=torch.long)))
        counts["text_encoders"] = text
    return counts


def h100_section(flops: dict[str, float], steps: int = 30) -> list[str]:
    """Markdown lines of the H100 estimate for SDXL at 1024x1024, `steps` steps, CFG."""
    unet_total = flops["unet"] * 2 * steps  # batch 2 under classifier-free guidance
    text_total = flops["text_encoders"] * 2
    vae_total = flops["vae_decoder"]
    floor = (unet_total + text_total) / (H100_FP16_TFLOPS * 1e12) + vae_total / (
        H100_TF32_TFLOPS * 1e12
    )
    unet_share = unet_total / (unet_total + text_total + vae_total)
    lines = [
        "",
        "### Estimate: SDXL base, 1024x1024, 30 steps, on one H100 (TensorRT)",
        "",
        "FLOPs counted with torch's FlopCounterMode on SDXL base's architecture (meta tensors):",
        "",
        "| component | per sample | per image (30 steps, CFG batch 2) | precision / H100 peak |",
        "|---|---:|---:|---|",
        f"| UNet | {flops['unet'] / 1e12:.2f} TFLOP | {unet_total / 1e12:.0f} TFLOP "
        f"| fp16, {H100_FP16_TFLOPS:.0f} TFLOPS dense |",
        f"| text encoders (both) | {flops['text_encoders'] / 1e12:.3f} TFLOP "
        f"| {text_total / 1e12:.2f} TFLOP | fp16 |",
        f"| VAE decoder | {flops['vae_decoder'] / 1e12:.1f} TFLOP | {vae_total / 1e12:.1f} TFLOP "
        f"| fp32 (TF32 tensor cores, {H100_TF32_TFLOPS:.0f} TFLOPS) |",
        "",
        f"Compute floor at 100% of peak: **{floor:.2f} s/image**. Assuming the engines sustain "
        "40-60% of tensor-core peak (an assumption, not a measurement: attention softmax and "
        "group norms are memory-bound, and the floor ignores launch gaps that CUDA graphs "
        f"remove), a TensorRT build should reach about **{floor / 0.6:.1f}-{floor / 0.4:.1f} "
        f"s/image**. The fp16 UNet is {unet_share:.0%} of the FLOPs, so its engine is what to "
        "optimize. Arithmetic only: no GPU was available here.",
    ]
    return lines


def human(size: int) -> str:
    """Bytes as KiB/MiB."""
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


def main() -> int:
    """Build engines, measure the three runners, print and optionally record the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=default_builtin_name(), help="built-in model name")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per runner")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()

    spec = make_spec(args.model, builtin_model_path(args.model, default_cache_dir()), {})
    files = read_model_files(spec.path)
    params = spec.default_request("a red circle on a blue background", seed=1)

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        engines_dir = Path(tmp) / spec.name
        started = time.perf_counter()
        summary = run_build(
            BuildOptions(spec.path, engines_dir, model_name=spec.name, progress=False),
            say=lambda text: None,
        )
        build_seconds = time.perf_counter() - started
        modules = load_modules(spec.path)
        runners = {
            "diffusers StableDiffusionXLPipeline (eager torch)": diffusers_runner(files, modules),
            "Kiln, torch backend": kiln_runner(
                SDXLPipeline(files, load_torch_engines(modules, files.dims))
            ),
            "Kiln, onnxruntime backend": kiln_runner(
                SDXLPipeline(files, load_engine_set("onnxruntime", files, engines_dir))
            ),
        }
        images = {name: run(params) for name, run in runners.items()}  # warm-up, kept
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.repeats):
            for name, run in runners.items():
                begin = time.perf_counter()
                run(params)
                times[name].append(time.perf_counter() - begin)

    load_after = os.getloadavg()[0]
    names = list(runners)
    median = {name: statistics.median(times[name]) for name in names}
    baseline = median[names[0]]
    reference = images[names[1]]
    flops = sdxl_flops()
    lines = [
        SECTION,
        "",
        f"Machine: {platform.machine()} ({cpu_name()}), "
        f"{os.cpu_count()} cores, torch {torch.__version__}, Python "
        f"{platform.python_version()}; measured {time.strftime('%Y-%m-%d')}.",
        f"Command: `.venv/bin/python benchmarks/backends.py {' '.join(sys.argv[1:])}`",
        f"Model `{spec.name}`, its default request: {params.width}x{params.height}, "
        f"{params.num_inference_steps} steps, guidance {params.guidance_scale}, "
        f"{params.scheduler}, 1 image, seed {params.seed}; median of {args.repeats} runs "
        "(interleaved), after one warm-up run each. 1-minute load average "
        f"{load_before:.1f} before, {load_after:.1f} after: on a shared machine absolute "
        "times swing with the load; the interleaved ratios are the comparable figure.",
        "",
        "| runner | s / image | speed-up vs diffusers | PSNR vs Kiln torch |",
        "|---|---:|---:|---:|",
    ]
    for name in names:
        quality = psnr(images[name], reference)
        shown = "identical" if quality == float("inf") else f"{quality:.1f} dB"
        lines.append(f"| {name} | {median[name]:.3f} | {baseline / median[name]:.2f}x | {shown} |")
    lines += [
        "",
        f"ONNX build (`kiln build-engines --format onnx`: export, polygraphy cleanup, "
        f"validation against torch at 2-3 shapes per graph): {build_seconds:.1f} s "
        f"(export and cleanup {summary.export_seconds:.1f} s, validation "
        f"{summary.validate_seconds:.1f} s).",
        "",
        "| engine | size | nodes before -> after cleanup |",
        "|---|---:|---:|",
    ]
    for file, size in summary.file_sizes.items():
        nodes = summary.node_counts.get(file.removesuffix(".onnx"), (0, 0))
        lines.append(f"| {file} | {human(size)} | {nodes[0]} -> {nodes[1]} |")
    lines.append(f"| total | {human(sum(summary.file_sizes.values()))} | |")
    lines += h100_section(flops)
    section = "\n".join(lines) + "\n"
    publish(SECTION, section, args.write_results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
