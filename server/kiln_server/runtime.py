"""Loading served models into resident pipelines, and warming them up."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, overload

import torch

from kiln_server.engines.base import EngineSet
from kiln_server.engines.components import ShapeRequest
from kiln_server.engines.device import Placement, bind_thread
from kiln_server.engines.flux_engines import FluxEngineSet
from kiln_server.engines.sample_inputs import sample_inputs
from kiln_server.engines.torch_engine import TorchEngine
from kiln_server.models.flux_loader import FluxModelFiles, read_flux_model_files
from kiln_server.models.loader import SDXLModelFiles, read_model_files
from kiln_server.models.registry import ModelSpec
from kiln_server.pipeline.flux import FluxPipeline
from kiln_server.pipeline.kinds import Pipeline
from kiln_server.pipeline.params import PreviewParams
from kiln_server.pipeline.sdxl import SDXLPipeline
from kiln_server.settings import ServerSettings

logger = logging.getLogger(__name__)

WARMUP_STEPS = 2


@dataclass
class LoadedModel:
    """A served model: its registry entry and its resident pipeline."""

    spec: ModelSpec
    pipeline: Pipeline


def model_engines_dir(engines_root: Path | None, model_name: str) -> Path | None:
    """Engines of one model live in <engines root>/<model name>/ (`kiln build-engines`)."""
    if engines_root is None:
        return None
    return engines_root / model_name


@overload
def load_engines(
    backend: str | None,
    files: SDXLModelFiles,
    engines_dir: Path | None,
    model_name: str,
    config: Path | None = None,
    threads: int | None = None,
    placement: Placement | None = None,
) -> EngineSet: ...


@overload
def load_engines(
    backend: str | None,
    files: FluxModelFiles,
    engines_dir: Path | None,
    model_name: str,
    config: Path | None = None,
    threads: int | None = None,
    placement: Placement | None = None,
) -> FluxEngineSet: ...


def load_engines(
    backend: str | None,
    files: SDXLModelFiles | FluxModelFiles,
    engines_dir: Path | None,
    model_name: str,
    config: Path | None = None,
    threads: int | None = None,
    placement: Placement | None = None,
) -> EngineSet | FluxEngineSet:
    """Load one model's engines (either family, by its files) on the requested (or
    fastest available) backend."""
    from kiln_server.engines.loading import (
        choose_backend,
        load_engine_set,
        load_flux_engine_set,
    )

    device = placement.device if placement is not None else None
    choice = choose_backend(backend, engines_dir, device)
    options: dict[str, Any] = {
        "model_name": model_name,
        "config": config,
        "threads": threads,
        "placement": placement,
    }
    engines: EngineSet | FluxEngineSet
    if isinstance(files, FluxModelFiles):
        engines = load_flux_engine_set(choice.backend, files, engines_dir, **options)
    else:
        engines = load_engine_set(choice.backend, files, engines_dir, **options)
    engines.reason = choice.reason
    return engines


def load_model(
    spec: ModelSpec,
    backend: str | None,
    engines_root: Path | None,
    config: Path | None = None,
    threads: int | None = None,
    placement: Placement | None = None,
) -> LoadedModel:
    """Read the model folder, load its engines once, and build its family's pipeline."""
    started = time.perf_counter()
    pipeline: Pipeline
    if spec.family == "flux":
        if placement is not None:
            placement = placement.for_family("flux")
        pipeline = load_flux_pipeline(spec, backend, engines_root, config, threads, placement)
        engines: Any = pipeline.engines
    else:
        files = read_model_files(spec.path, spec.preview_decoder, checkpoint=spec.checkpoint)
        engines_dir = model_engines_dir(engines_root, spec.name)
        engines = load_engines(backend, files, engines_dir, spec.name, config, threads, placement)
        pipeline = SDXLPipeline(files, engines)
    logger.info(
        "model loaded",
        extra={
            "model": spec.name,
            "backend": engines.backend,
            "why": engines.reason,
            "placement": engines.placement,
            "limits": pipeline.limits.describe(),
            "path": str(spec.source),
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
    return LoadedModel(spec=spec, pipeline=pipeline)


def load_flux_pipeline(
    spec: ModelSpec,
    backend: str | None,
    engines_root: Path | None = None,
    config: Path | None = None,
    threads: int | None = None,
    placement: Placement | None = None,
) -> FluxPipeline:
    """A FLUX model's pipeline on the requested (or fastest available) backend: its
    engines in <engines root>/<model name>/ as SDXL's (`kiln build-engines`)."""
    files = read_flux_model_files(spec.path)
    engines_dir = model_engines_dir(engines_root, spec.name)
    engines = load_engines(backend, files, engines_dir, spec.name, config, threads, placement)
    return FluxPipeline(files, engines)


def batch_row_limit(model: LoadedModel, server_default: int) -> int:
    """UNet rows per step: the model's setting (else the server's), capped by the engines'
    declared UNet rows (a TensorRT profile's maximum; torch and onnxruntime take any)."""
    limit = model.spec.max_batch_rows or server_default
    engine_max = model.pipeline.limits.unet_rows
    return limit if engine_max is None else min(limit, engine_max)


def warm_up(model: LoadedModel, unet_rows: Sequence[int] = ()) -> float:
    """Pay every first-call cost before SERVING; return the seconds it took.

    A short generation at the model's default size (with a preview by every method the
    model serves, so its preview decoder too) runs every engine once (the VAE encoder
    separately): the first call allocates buffers and selects kernels, and the second call
    of a shape is the one TensorRT captures a CUDA graph on, hence two steps. `unet_rows`
    lists further denoiser (UNet or FLUX transformer) batch sizes to run at the default
    size: with torch.compile or CUDA
    graphs each new shape compiles or captures, so the batch sizes the batcher forms are
    paid for here, not by a user's request.
    """
    spec = model.spec
    params = spec.default_request(
        "warm-up", num_inference_steps=WARMUP_STEPS, preview=PreviewParams(every_n_steps=1)
    )
    started = time.perf_counter()
    # Either family's pipeline; its state goes back to it (mypy cannot pair the unions).
    pipeline: Any = model.pipeline
    state = pipeline.prepare(params)
    while not state.finished:
        pipeline.denoise_step([state])
        # Every preview method the model serves (the preview decoder is an engine too).
        for method in pipeline.limits.preview_methods:
            pipeline.preview(state, replace(params.preview, method=method))
    pipeline.decode(state).cpu()
    engines = pipeline.engines
    # Further batch sizes of the denoiser (SDXL's UNet, FLUX's transformer), the VAE encoder.
    denoiser = engines.unet if isinstance(engines, EngineSet) else engines.transformer
    calls = [(denoiser, rows) for rows in unet_rows]
    if engines.vae_encoder is not None:  # for image inputs; the loop above skips it
        calls.append((engines.vae_encoder, 1))
    for engine, rows in calls:
        request = ShapeRequest(rows, spec.default_height, spec.default_width)
        inputs = sample_inputs(engine.spec, request)
        engine.infer({name: value.to(pipeline.device) for name, value in inputs.items()})
    if isinstance(denoiser, TorchEngine):
        # No new CUDA graph captures while serving: they would stall the running batch.
        denoiser.seal()
    seconds = time.perf_counter() - started
    logger.info("model warmed up", extra={"model": spec.name, "seconds": round(seconds, 3)})
    return seconds


def default_engine_threads() -> int:
    """Every available core but one, which the API process needs for gRPC and encoding.

    CPU kernels whose threads spin on a core another busy process holds lose far more than
    the extra thread gains: on 2 cores, two engine threads doubled a single request's
    latency beside the API process (benchmarks/RESULTS.md).
    """
    from kiln_server.engines.onnxruntime_engine import available_cores

    return max(1, available_cores() - 1)


def serve_loras(model: LoadedModel, settings: ServerSettings) -> None:
    """Let `model` apply per-request LoRAs from its LoRA folders, when it has any and its
    engines apply them (torch; onnxruntime and TensorRT graphs built with LoRA inputs):
    `settings.lora_slots` adapters of rank up to `settings.max_lora_rank`
    (kiln_server.lora.serving). Comes before warm-up, which then runs (and compiles) the
    UNet with its LoRA layers in place. Raises EngineError when compiled engines were built
    for other LoRA settings."""
    if not model.spec.lora_dirs:
        return
    if isinstance(model.pipeline, FluxPipeline):
        logger.warning(
            "the model has LoRA folders but FLUX models serve no LoRAs yet",
            extra={"model": model.spec.name},
        )
        return
    from kiln_server.lora.folders import LoraFolders
    from kiln_server.lora.policy import refusal_for_engines
    from kiln_server.lora.serving import LoraSettings, engine_lora_library

    library = engine_lora_library(
        model.pipeline.engines,
        LoraFolders.of(model.spec.lora_dirs),
        LoraSettings(settings.lora_slots, settings.max_lora_rank, settings.max_loras_per_request),
    )
    if library is None:
        logger.warning(
            "the model has LoRA folders but its engines apply no LoRAs",
            extra={
                "model": model.spec.name,
                "backend": model.pipeline.backend,
                "why": refusal_for_engines(model.pipeline.engines),
            },
        )
        return
    model.pipeline.loras = library


def engine_placement(settings: ServerSettings) -> tuple[Placement, int]:
    """Resolve the engines' device, precision and compilation from `settings`, bind this
    thread to the device, and set torch's intra-op threads; return the placement and the
    thread count (`settings.intra_op_threads`, 0 meaning `default_engine_threads()`).
    Raises EngineError when the device settings cannot run here."""

    placement = Placement.resolve(
        settings.device,
        settings.dtype,
        compile=settings.compile,
        cuda_graphs=settings.cuda_graphs,
    )
    bind_thread(placement.device)
    threads = settings.intra_op_threads or default_engine_threads()
    torch.set_num_threads(threads)
    logger.info("engine placement", extra={"threads": threads, "placement": placement.describe()})
    return placement, threads
