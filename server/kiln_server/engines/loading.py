"""Choosing a backend and loading a model's engines on it, once, at start-up.

`choose_backend` picks the fastest backend the device and the engines directory allow.
`load_engine_set` (SDXL) and `load_flux_engine_set` (FLUX) check the engines directory's
manifest against the served model and this machine before they load anything, then load
every engine once (the server's warm-up generation then pays the first-call costs before
it reports SERVING).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kiln_server.engines.base import BACKENDS, Engine, EngineError, EngineSet
from kiln_server.engines.components import ComponentSpec, ShapeRequest, sdxl_component_specs
from kiln_server.engines.device import Placement
from kiln_server.engines.manifest import (
    MANIFEST_NAME,
    CheckContext,
    Manifest,
    build_command,
    check_onnx_engines,
    check_tensorrt_engines,
    read_manifest,
)

if TYPE_CHECKING:
    from kiln_server.engines.flux_engines import FluxEngineSet
    from kiln_server.models.flux_loader import FluxModelFiles
    from kiln_server.models.loader import SDXLModelFiles

log = logging.getLogger(__name__)

# The pipeline cannot run without these; the VAE encoder (img2img) and the learned preview
# decoder are loaded when present.
REQUIRED_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")
FLUX_REQUIRED_COMPONENTS = ("text_encoder", "text_encoder_2", "transformer", "vae_decoder")


def _manifest_if_present(engines_dir: Path | None) -> Manifest | None:
    if engines_dir is None or not (engines_dir / MANIFEST_NAME).is_file():
        return None
    return read_manifest(engines_dir)


@dataclass(frozen=True)
class BackendChoice:
    """The backend to serve with and why: the start-up log and ListModels show both."""

    backend: str
    reason: str


def choose_backend(
    requested: str | None, engines_dir: Path | None, device: torch.device | None = None
) -> BackendChoice:
    """The backend to serve with on `device` (default: the CPU), and why that one.

    An explicit `requested` backend is returned as is (EngineError when it is not one of
    BACKENDS; whether it can load is `load_engine_set`'s concern). Otherwise the fastest
    available: `tensorrt` when TensorRT and CUDA work here and the manifest in
    `engines_dir` has engines built for this GPU; else, on a GPU, `torch` on CUDA; else
    `onnxruntime` when the manifest has ONNX graphs; else `torch`. A corrupt manifest
    raises EngineError rather than being ignored.
    """
    if requested is not None:
        if requested not in BACKENDS:
            raise EngineError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
        return BackendChoice(requested, "requested with --backend")
    manifest = _manifest_if_present(engines_dir)
    if device is None or device.type != "cuda":
        if manifest is not None and manifest.onnx:
            return BackendChoice("onnxruntime", f"ONNX graphs in {engines_dir}, on the CPU")
        why = "no engines directory (--engines)" if manifest is None else "no ONNX graphs"
        return BackendChoice("torch", f"torch on the CPU: {why}")
    why_not_tensorrt = "no engines directory (--engines)"
    if manifest is not None and engines_dir is not None:
        why_not_tensorrt = f"{engines_dir} has no TensorRT engines"
        if manifest.tensorrt:
            from kiln_server.engines.machine import probe_machine, tensorrt_missing

            missing = tensorrt_missing()
            if missing:
                why_not_tensorrt = f"TensorRT cannot run here (missing {' and '.join(missing)})"
            elif manifest.tensorrt_build_for(probe_machine(device=_index(device))) is None:
                why_not_tensorrt = (
                    f"the TensorRT engines in {engines_dir} were built for another GPU"
                )
            else:
                return BackendChoice(
                    "tensorrt", f"TensorRT engines built for this GPU in {engines_dir}"
                )
    return BackendChoice("torch", f"torch on CUDA: {why_not_tensorrt}")


def _index(device: torch.device | None) -> int:
    return 0 if device is None or device.index is None else device.index


def resolve_backend(
    requested: str | None, engines_dir: Path | None, device: torch.device | None = None
) -> str:
    """The name of `choose_backend`'s choice."""
    return choose_backend(requested, engines_dir, device).backend


def load_engine_set(
    backend: str,
    files: SDXLModelFiles,
    engines_dir: Path | None,
    *,
    model_name: str | None = None,
    config: Path | None = None,
    verify_hashes: bool = True,
    threads: int | None = None,
    placement: Placement | None = None,
) -> EngineSet:
    """Load every engine of the model in `files` on `backend`, once.

    torch: the model's weights in eager mode (engines_dir unused). onnxruntime and tensorrt:
    the manifest in `engines_dir` is checked first (model content hash, graph interfaces,
    file sizes and hashes, and for TensorRT this machine's GPU, compute capability,
    TensorRT and CUDA versions); any mismatch, missing or corrupt file raises EngineError
    naming the differing value and the `kiln build-engines` command that fixes it, before
    any engine is loaded. For tensorrt, missing TensorRT or CUDA is reported first.
    `model_name` is the model's name in that command (default: the engines directory's
    name, as engines of model NAME live in <engines root>/NAME/); `config` is the server's
    config file that defines NAME, added to the command as `--config`. `placement` is the
    device and precision (default: the CPU in fp32); onnxruntime runs on the GPU when
    onnxruntime-gpu is installed and falls back to the CPU (saying so) otherwise; TensorRT
    engines carry their own precision.

    Engines built with per-row LoRA inputs (the manifest's `lora`) get a UNet declaration
    with them, and the compiled UNet engine a `CompiledLora` whose feed reads an adapter
    stack over the UNet's weightless per-row layers on the graphs' device
    (kiln_server.lora.serving makes the library). Every compiled UNet engine's
    `CompiledLora` also carries the rebuild command that LoRA messages name.
    """
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    has_preview_decoder = files.preview_decoder_path is not None
    specs = sdxl_component_specs(files.dims, preview_decoder=has_preview_decoder)
    # A model with a preview decoder needs its graph: engines built without it are stale.
    required = REQUIRED_COMPONENTS + (("preview_decoder",) if has_preview_decoder else ())
    placement = placement or Placement(torch.device("cpu"), torch.float32)
    if backend == "torch":
        from kiln_server.engines.torch_engine import load_torch_engines, vae_dtype
        from kiln_server.models.loader import load_modules

        modules = load_modules(
            files.path,
            placement.dtype,
            vae_dtype(placement.dtype, files.vae_force_upcast),
            preview_decoder=files.preview_decoder_path,
            checkpoint=files.checkpoint,
        )
        return load_torch_engines(modules, files.dims, placement, vae_upcast=files.vae_force_upcast)
    opened = _open_compiled(backend, engines_dir, placement, model_name, config)
    manifest, device = opened.manifest, opened.device
    lora_layers = None
    if manifest.lora is not None:
        from kiln_server.lora.graph import lora_inputs, shape_only_unet, unet_config_of

        # The layers the graph's LoRA inputs belong to, derived as the build did; their
        # adapter stacks will live where the graphs run.
        lora_layers = shape_only_unet(unet_config_of(files.path), device)
        record = manifest.lora
        specs = sdxl_component_specs(
            files.dims,
            preview_decoder=has_preview_decoder,
            lora=lora_inputs(
                lora_layers.layers,
                slots=record.slots,
                max_rank=record.max_rank,
                max_loras=record.max_loras,
            ),
        )
    from kiln_server.models.loader import model_content_hash

    ctx = CheckContext(
        engines_dir=opened.engines_dir,
        model_hash=model_content_hash(files.path, checkpoint=files.checkpoint),
        model_path=files.source,
        model_name=model_name,
    )
    engines = _load_compiled(opened, specs, required, ctx, verify_hashes, threads)
    device = opened.device
    from kiln_server.engines.onnxruntime_engine import OnnxRuntimeEngine
    from kiln_server.engines.tensorrt_engine import TensorRTEngine

    unet = engines["unet"]
    if isinstance(unet, OnnxRuntimeEngine | TensorRTEngine):
        from kiln_server.lora.graph_feed import CompiledLora, GraphLoraFeed

        # The rebuild command without the manifest's LoRA flags: the server adds its own.
        rebuild = ctx.fix(replace(manifest, lora=None), opened.fmt)
        feed = None
        if lora_layers is not None and unet.spec.lora is not None:
            feed = GraphLoraFeed(unet.spec.lora, lora_layers.layers, device)
        unet.lora = CompiledLora(
            backend, rebuild, feed, lora_layers.config if lora_layers is not None else None
        )
    return EngineSet(
        device=device,
        placement=opened.description,
        backend=backend,
        text_encoder=engines["text_encoder"],
        text_encoder_2=engines["text_encoder_2"],
        unet=engines["unet"],
        vae_decoder=engines["vae_decoder"],
        vae_encoder=engines.get("vae_encoder"),
        preview_decoder=engines.get("preview_decoder"),
    )


@dataclass
class _Compiled:
    """A compiled backend opened for one engines directory: its checked manifest, where
    the engines will run, and what loading them needs. `_load_compiled` fills `device`
    (TensorRT's runtime names its GPU) and `description` once the engines are loaded."""

    backend: str
    fmt: str
    engines_dir: Path
    manifest: Manifest
    device: torch.device
    placement: Placement
    machine: Any = None
    providers: list[Any] = field(default_factory=list)
    description: str = ""


def _open_compiled(
    backend: str,
    engines_dir: Path | None,
    placement: Placement,
    model_name: str | None,
    config: Path | None,
) -> _Compiled:
    """Check that `backend` (onnxruntime or tensorrt) can serve from `engines_dir` here and
    read its manifest; EngineError naming the fix otherwise. Missing TensorRT or CUDA, and
    a CPU device for TensorRT, are reported before the manifest is read."""
    if placement.compile or placement.cuda_graphs:
        raise EngineError(
            f"--compile and --cuda-graphs apply to the torch backend, not {backend} "
            "(TensorRT engines replay CUDA graphs by themselves)"
        )
    fmt = "onnx" if backend == "onnxruntime" else "tensorrt"
    if engines_dir is None:
        raise EngineError(
            f"the {backend} backend serves prebuilt engines: pass --engines DIR (build them "
            f"with `kiln build-engines --format {fmt} --out DIR`)"
        )
    machine = None
    if backend == "tensorrt":
        from kiln_server.engines.machine import probe_machine

        # Missing TensorRT or CUDA is reported before anything else is checked, and a CPU
        # device before the manifest's checks read every engine file.
        machine = probe_machine("serve with --backend tensorrt", _index(placement.device))
        if placement.device.type != "cuda":
            raise EngineError(
                f"TensorRT engines run on a GPU, not on {placement.device}: serve with "
                "--device cuda[:N] or another --backend"
            )
    config_arg = str(config) if config is not None else None
    fix = build_command(fmt, engines_dir, model_name=model_name, config=config_arg)
    manifest = read_manifest(engines_dir, fix)
    if config_arg is not None:
        manifest.config = config_arg
    providers: list[Any] = []
    # TensorRT's runtime names its GPU with an index: the LoRA stacks must be on that one.
    device = torch.device("cuda", _index(placement.device)) if machine else placement.device
    if backend == "onnxruntime":
        from kiln_server.engines.onnxruntime_engine import default_providers, providers_device

        providers = default_providers(device)
        device = providers_device(providers)
        if placement.device.type == "cuda" and device.type == "cpu":
            log.warning(
                "onnxruntime has no CUDA provider here (install the `gpu` extra, "
                "onnxruntime-gpu): its graphs run on the CPU"
            )
    return _Compiled(backend, fmt, engines_dir, manifest, device, placement, machine, providers)


def _load_compiled(
    opened: _Compiled,
    specs: dict[str, ComponentSpec],
    required: tuple[str, ...],
    ctx: CheckContext,
    verify_hashes: bool,
    threads: int | None,
) -> dict[str, Engine]:
    """Check the manifest's engines against `specs` and this machine, then load every one
    (`required` must be present; the others are loaded when they are)."""
    from kiln_server.engines.onnxruntime_engine import OnnxRuntimeEngine

    engines: dict[str, Engine] = {}
    if opened.backend == "onnxruntime":
        paths = check_onnx_engines(
            opened.manifest, specs, ctx, required=required, verify_hash=verify_hashes
        )
        for name, path in paths.items():
            engines[name] = OnnxRuntimeEngine(
                specs[name], path, providers=opened.providers, threads=threads
            )
        opened.description = f"{opened.device} fp32"
        return engines
    from kiln_server.engines.tensorrt_engine import TensorRTRuntime

    found = check_tensorrt_engines(
        opened.manifest, specs, ctx, opened.machine, required=required, verify_hash=verify_hashes
    )
    runtime = TensorRTRuntime(opened.placement.device.index or 0)
    for name, (path, _) in found.items():
        engines[name] = runtime.load(specs[name], path)
    size = runtime.share_device_memory()
    log.info("TensorRT engines share %.1f MiB of device scratch memory", size / 2**20)
    opened.device = runtime.device
    opened.description = f"{runtime.device}, precision per engine (manifest)"
    return engines


def load_flux_engine_set(
    backend: str,
    files: FluxModelFiles,
    engines_dir: Path | None,
    *,
    model_name: str | None = None,
    config: Path | None = None,
    verify_hashes: bool = True,
    threads: int | None = None,
    placement: Placement | None = None,
) -> FluxEngineSet:
    """`load_engine_set` for a FLUX model: every engine of the model in `files` on
    `backend`, once, after the same manifest checks (onnxruntime and tensorrt; the
    rebuild command in their errors is `kiln build-engines` for this model). torch loads
    the diffusers modules in `placement`'s dtype (under fp16 the VAE stays fp32 when its
    config asks, as FLUX.1's does). The VAE encoder is loaded when the engines have it."""
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    from kiln_server.engines.flux_components import flux_component_specs
    from kiln_server.engines.flux_engines import FluxEngineSet

    placement = placement or Placement(torch.device("cpu"), torch.float32)
    if backend == "torch":
        from kiln_server.engines.flux_torch import load_flux_torch_engines
        from kiln_server.models.flux_loader import load_flux_modules

        if placement.dtype == torch.float16 and placement.device.type == "cuda":
            log.warning(
                "FLUX in fp16 (--dtype fp16) can overflow to NaN, black images; bf16 is "
                "FLUX's own precision (the default for FLUX models on a GPU)"
            )
        modules = load_flux_modules(files.path, dtype=placement.dtype)
        return load_flux_torch_engines(
            modules, files.dims, placement, vae_upcast=files.vae_force_upcast
        )
    from kiln_server.models.loader import model_content_hash

    opened = _open_compiled(backend, engines_dir, placement, model_name, config)
    ctx = CheckContext(
        engines_dir=opened.engines_dir,
        model_hash=model_content_hash(files.path),
        model_path=files.path,
        model_name=model_name,
    )
    specs = flux_component_specs(files.dims)
    engines = _load_compiled(opened, specs, FLUX_REQUIRED_COMPONENTS, ctx, verify_hashes, threads)
    return FluxEngineSet(
        backend=backend,
        text_encoder=engines["text_encoder"],
        text_encoder_2=engines["text_encoder_2"],
        transformer=engines["transformer"],
        vae_decoder=engines["vae_decoder"],
        vae_encoder=engines.get("vae_encoder"),
        device=opened.device,
        placement=opened.description,
    )


def default_request(files: SDXLModelFiles) -> ShapeRequest:
    """One image at the model's default size (kiln.json, else SDXL's 1024x1024)."""
    config = files.kiln_config or {}
    return ShapeRequest(
        batch=1,
        height=int(config.get("default_height", 1024)),
        width=int(config.get("default_width", 1024)),
    )
