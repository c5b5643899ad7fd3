"""Loading served models into resident pipelines, and warming them up."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from kiln_server.engines.base import EngineSet
from kiln_server.models.loader import SDXLModelFiles, read_model_files
from kiln_server.models.registry import ModelRegistry, ModelSpec
from kiln_server.pipeline.params import PreviewParams
from kiln_server.pipeline.sdxl import SDXLPipeline

logger = logging.getLogger(__name__)

WARMUP_STEPS = 2


@dataclass
class LoadedModel:
    """A served model: its registry entry and its resident pipeline."""

    spec: ModelSpec
    pipeline: SDXLPipeline


def model_engines_dir(engines_root: Path | None, model_name: str) -> Path | None:
    """Engines of one model live in <engines root>/<model name>/ (`kiln build-engines`)."""
    if engines_root is None:
        return None
    return engines_root / model_name


def load_engines(
    backend: str | None,
    files: SDXLModelFiles,
    engines_dir: Path | None,
    model_name: str,
    config: Path | None = None,
    threads: int | None = None,
) -> EngineSet:
    """Load one model's engines on the requested (or fastest available) backend."""
    from kiln_server.engines.loading import load_engine_set, resolve_backend

    chosen = resolve_backend(backend, engines_dir)
    return load_engine_set(
        chosen, files, engines_dir, model_name=model_name, config=config, threads=threads
    )


def load_model(
    spec: ModelSpec,
    backend: str | None,
    engines_root: Path | None,
    config: Path | None = None,
    threads: int | None = None,
) -> LoadedModel:
    """Read the model folder, load its engines once, and build its pipeline."""
    started = time.perf_counter()
    files = read_model_files(spec.path)
    engines_dir = model_engines_dir(engines_root, spec.name)
    engines = load_engines(backend, files, engines_dir, spec.name, config, threads)
    pipeline = SDXLPipeline(files, engines)
    logger.info(
        "model loaded",
        extra={
            "model": spec.name,
            "backend": engines.backend,
            "path": str(spec.path),
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
    return LoadedModel(spec=spec, pipeline=pipeline)


def warm_up(model: LoadedModel) -> float:
    """Run a short generation at the model's default size (with a preview); return seconds.

    The first call into an engine allocates buffers and (on a GPU) selects kernels; doing
    it here keeps that cost out of the first user's request.
    """
    spec = model.spec
    params = spec.default_request(
        "warm-up", num_inference_steps=WARMUP_STEPS, preview=PreviewParams(every_n_steps=1)
    )
    started = time.perf_counter()
    pipeline = model.pipeline
    state = pipeline.prepare(params)
    while not state.finished:
        pipeline.denoise_step([state])
        pipeline.preview(state, params.preview)
    pipeline.decode(state)
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


def load_registry_models(
    registry: ModelRegistry,
    backend: str | None,
    engines_root: Path | None,
    config: Path | None = None,
    threads: int | None = None,
) -> dict[str, LoadedModel]:
    """Load and warm up every model of the registry, in registry order.

    `threads` sets the CPU engines' intra-op threads (torch and onnxruntime); None or 0
    means `default_engine_threads()`.
    """
    import torch

    threads = threads or default_engine_threads()
    torch.set_num_threads(threads)
    logger.info("engine threads", extra={"threads": threads})
    loaded: dict[str, LoadedModel] = {}
    for spec in registry.models.values():
        logger.info("loading model", extra={"model": spec.name, "path": str(spec.path)})
        loaded[spec.name] = load_model(spec, backend, engines_root, config, threads)
        logger.info("warming up model", extra={"model": spec.name})
        warm_up(loaded[spec.name])
    return loaded
