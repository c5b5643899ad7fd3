"""TensorRT 10 engine builds from the cleaned ONNX graphs, one engine file per component.

Precision: SDXL's UNet and text encoders build in fp16 (TensorRT picks fp16 kernels where
they are faster; inputs and outputs stay fp32 as declared); its VAE stays fp32, because
SDXL's VAE overflows fp16 and decodes black images. FLUX components build in bf16 (its
transformer overflows fp16). Engines are refittable (weights, e.g. a LoRA's,
can be swapped in later without a rebuild) only when asked for: keeping weights replaceable
rules out some of TensorRT's weight-dependent optimizations, so such engines can be slower.
Each engine uses the optimization profiles from `profiles.py`, and reads and extends one
timing cache per machine so rebuilds skip kernel timing.

File names carry the GPU, compute capability, TensorRT and CUDA major versions, so builds
for two machines never overwrite each other. Only `build_engine` touches TensorRT (imported
inside it); the naming and precision logic is pure.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln_server.atomic_files import write_atomic
from kiln_server.engines.base import EngineError
from kiln_server.engines.components import ComponentSpec, ShapeRange
from kiln_server.engines.flux_components import FluxComponentSpec
from kiln_server.engines.manifest import MachineInfo, cuda_major

PRECISION = {
    "text_encoder": "fp16",
    "text_encoder_2": "fp16",
    "unet": "fp16",
    "vae_decoder": "fp32",
    "vae_encoder": "fp32",
    # TAESD-style decoders are fp16-safe, and a preview is an approximation anyway.
    "preview_decoder": "fp16",
}
# FLUX: bf16 throughout, as NVIDIA's FLUX demo builds it in its bf16 mode. The transformer's
# activations overflow fp16, T5's are known to as well, and bf16 keeps fp32's range.
FLUX_PRECISION = {
    "text_encoder": "bf16",
    "text_encoder_2": "bf16",
    "transformer": "bf16",
    "vae_decoder": "bf16",
    "vae_encoder": "bf16",
}
BUILDER_FLAGS = {"fp16": "FP16", "bf16": "BF16", "fp32": None}
DEFAULT_WORKSPACE_BYTES = 8 << 30


def precision_for(spec: ComponentSpec) -> str:
    """ "fp16", "bf16" or "fp32" for a component of its family (fp32 for anything not
    listed: the safe choice)."""
    table = FLUX_PRECISION if isinstance(spec, FluxComponentSpec) else PRECISION
    return table.get(spec.name, "fp32")


def machine_tag(machine: MachineInfo) -> str:
    """Filename-safe tag naming everything an engine is tied to.

    E.g. 'nvidia-h100-80gb-hbm3.sm90.trt10.3.0.cu12'. Distinct GPU names, compute
    capabilities, TensorRT versions or CUDA major versions give distinct tags.
    """
    gpu = re.sub(r"[^a-z0-9]+", "-", machine.gpu_name.lower()).strip("-") or "gpu"
    capability = machine.compute_capability.replace(".", "")
    version = re.sub(r"[^A-Za-z0-9.]+", "-", machine.tensorrt_version)
    cuda = re.sub(r"[^A-Za-z0-9]+", "-", cuda_major(machine.cuda_version))
    return f"{gpu}.sm{capability}.trt{version}.cu{cuda}"


def engine_file_name(component: str, machine: MachineInfo) -> str:
    """The engine file of `component` built on `machine`: '<component>.<machine tag>.plan'."""
    return f"{component}.{machine_tag(machine)}.plan"


def timing_cache_name(machine: MachineInfo) -> str:
    """The timing cache file shared by every build on `machine`."""
    return f"timing-cache.{machine_tag(machine)}.bin"


@dataclass(frozen=True)
class BuildResult:
    """One built engine: its file, precision, profiles, refittability, and build time."""

    component: str
    path: Path
    precision: str
    profiles: tuple[ShapeRange, ...]
    seconds: float
    refittable: bool = False


def build_engine(
    trt: Any,
    spec: ComponentSpec,
    onnx_path: Path,
    engine_path: Path,
    profiles: Sequence[ShapeRange],
    *,
    timing_cache: Path | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    refittable: bool = False,
) -> BuildResult:
    """Build and serialize the engine of `spec` from `onnx_path` into `engine_path`.

    `trt` is the imported tensorrt module (see machine.require_tensorrt). One optimization
    profile per ShapeRange, in order (the first, static, is the default). The timing cache
    file is read when present and rewritten with what this build timed. `refittable` sets
    BuilderFlag.REFIT (weights replaceable later; off by default, as it can cost speed).
    Raises EngineError with TensorRT's parser or builder errors when the build fails.
    """
    precision = precision_for(spec)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10 networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse the {spec.name} graph {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    flag = BUILDER_FLAGS[precision]
    if flag is not None:
        # Weakly typed: TensorRT may pick this precision's kernels; I/O stays as declared.
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for shape_range in profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in spec.profile(shape_range).items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)

    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(
            f"TensorRT failed to build the {spec.name} engine (see the TensorRT log above)"
        )
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(engine_path, memoryview(serialized))
    if timing_cache is not None:
        write_atomic(timing_cache, memoryview(config.get_timing_cache().serialize()))
    return BuildResult(
        spec.name,
        engine_path,
        precision,
        tuple(profiles),
        time.perf_counter() - start,
        refittable=refittable,
    )
