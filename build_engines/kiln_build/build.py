"""The build-engines stages in order: export, clean, validate, (TensorRT) build and numerics
check, manifest.

For `--format tensorrt` the TensorRT and CUDA check runs first, before any model is read, so
a host without them fails in a second, and the profile flags are resolved against the
model's limits before anything is exported. Graphs are exported, cleaned and validated in a
staging folder and only moved into the output directory once every one of them passed;
TensorRT engines likewise are built and compared with onnxruntime in a staging folder and
moved in once all passed. So a failed build never leaves files that do not match the
manifest. A TensorRT build reuses the ONNX graphs already in the directory when they belong
to the same model and opset.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kiln_build.profiles import (
    ModelLimits,
    ProfileFlags,
    ProfilePlan,
    component_profiles,
    resolve_plan,
)
from kiln_build.targets import BuildTarget, read_target
from kiln_server.engines.base import EngineError
from kiln_server.engines.components import ComponentSpec
from kiln_server.engines.manifest import (
    MANIFEST_NAME,
    CheckContext,
    LoraRecord,
    MachineInfo,
    Manifest,
    ModelRecord,
    OnnxComponent,
    TensorRTBuild,
    TensorRTComponent,
    check_onnx_engines,
    file_sha256,
    read_manifest,
    tensor_entries,
    write_manifest,
)
from kiln_server.models.family import FLUX

T = TypeVar("T")


@dataclass
class BuildOptions:
    """Everything `kiln build-engines` was asked for."""

    model_path: Path
    out_dir: Path  # this model's own engines directory (<root>/<model name>)
    fmt: str = "onnx"
    model_name: str | None = None
    config: str | None = None  # the --config file that named the model, for rebuild hints
    default_size: tuple[int, int] | None = None  # (height, width); default: the model's
    opset: int = 17
    flags: ProfileFlags = field(default_factory=ProfileFlags)
    # The served model's request limits the default profiles cover; None: read them from
    # the model folder (its kiln.json, else the registry's defaults).
    limits: ModelLimits | None = None
    # The config's `preview_decoder` folder; None: the model folder's own, if any.
    preview_decoder: Path | None = None
    # A single-file checkpoint whose weights replace model_path's (its config folder).
    checkpoint: Path | None = None
    validate: bool = True
    rtol: float = 1e-3
    timing_cache: Path | None = None
    workspace_bytes: int = 8 << 30
    refittable: bool = False  # TensorRT: engines whose weights can be refitted (can be slower)
    numerics_check: bool = True  # TensorRT: compare each engine with onnxruntime
    progress: bool = True
    # Per-row LoRA inputs on the UNet graph (slots, rank, LoRAs per request); None: none.
    lora: LoraRecord | None = None


@dataclass
class BuildSummary:
    """What a build produced, for the CLI's report and the benchmark."""

    manifest_path: Path
    reused_onnx: bool = False
    export_seconds: float = 0.0
    validate_seconds: float = 0.0
    tensorrt_seconds: float = 0.0
    file_sizes: dict[str, int] = field(default_factory=dict)
    validation: list[str] = field(default_factory=list)
    node_counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    # TensorRT: each engine's comparison with onnxruntime, one line per component.
    numerics: dict[str, str] = field(default_factory=dict)


def _stage(items: Iterable[T], desc: str, enabled: bool, total: int) -> Iterator[T]:
    from tqdm import tqdm

    return iter(
        tqdm(
            items,
            desc=f"{desc:>8}",
            unit="graph",
            total=total,
            disable=not enabled,
            file=sys.stderr,
        )
    )


def _existing_manifest(
    out_dir: Path, model_hash: str, say: Callable[[str], None]
) -> Manifest | None:
    if not (out_dir / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_manifest(out_dir)
    except EngineError as exc:
        say(f"replacing the unreadable manifest in {out_dir}: {exc}")
        return None
    if manifest.model.content_hash != model_hash:
        say(f"{out_dir} held engines of another model ({manifest.model.path}); replacing them")
        return None
    return manifest


def _reusable_onnx(
    manifest: Manifest | None, specs: dict[str, ComponentSpec], ctx: CheckContext, opset: int
) -> bool:
    if manifest is None or any(c.opset != opset for c in manifest.onnx.values()):
        return False
    try:
        check_onnx_engines(manifest, specs, ctx, required=tuple(specs))
    except EngineError:
        return False
    return True


def run_build(options: BuildOptions, say: Callable[[str], None] | None = None) -> BuildSummary:
    """Run every stage for `options`; returns the summary, raises EngineError on any failure.

    Failure paths (missing TensorRT or CUDA, unusable flags, a graph that fails the checker
    or differs from torch, a TensorRT build error, an engine that differs from onnxruntime)
    raise EngineError with a message naming what failed; nothing in the output directory
    changes for a failed ONNX stage, and no engine or manifest for a failed TensorRT stage.
    """
    report = say or (lambda text: print(text, file=sys.stderr))
    trt: Any = None
    machine: MachineInfo | None = None
    if options.fmt == "tensorrt":
        from kiln_server.engines.machine import probe_machine, require_tensorrt

        trt = require_tensorrt("build TensorRT engines")
        machine = probe_machine("build TensorRT engines")
    elif options.fmt != "onnx":
        raise EngineError(f"--format {options.fmt!r}: choose onnx or tensorrt")

    from kiln_server.models.loader import model_content_hash

    target = read_target(
        options.model_path,
        preview_decoder=options.preview_decoder,
        checkpoint=options.checkpoint,
        lora=options.lora,
        default_size=options.default_size,
    )
    specs, default = target.specs, target.default
    if machine is not None and target.family == FLUX:
        require_bf16(machine)
    plan: ProfilePlan | None = None
    if trt is not None:
        limits = options.limits or _folder_limits(options)
        plan = resolve_plan(options.flags, default, limits, target.size_multiple)
    model_hash = model_content_hash(options.model_path, checkpoint=options.checkpoint)
    out_dir = options.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = CheckContext(out_dir, model_hash, target.source, options.model_name)
    manifest = _existing_manifest(out_dir, model_hash, report) or Manifest(
        model=ModelRecord(options.model_name, str(target.source), model_hash)
    )
    manifest.model = ModelRecord(options.model_name, str(target.source), model_hash)
    manifest.config = options.config
    previous_lora, manifest.lora = manifest.lora, options.lora
    summary = BuildSummary(manifest_path=out_dir / MANIFEST_NAME)

    if (
        options.fmt == "tensorrt"
        and previous_lora == options.lora
        and _reusable_onnx(manifest, specs, ctx, options.opset)
    ):
        summary.reused_onnx = True
        report(f"reusing the ONNX graphs in {out_dir} (same model, opset {options.opset})")
    else:
        _onnx_stages(options, target, model_hash, manifest, summary)
        write_manifest(out_dir, manifest)

    for name, entry in manifest.onnx.items():
        summary.file_sizes[entry.file] = entry.size_bytes + entry.external_data_bytes
        summary.validation += [
            f"{name} batch {v.get('batch')} at {v.get('width')}x{v.get('height')}: "
            f"rel {float(v.get('max_rel_error', 0.0)):.2e}"
            for v in entry.validated
        ]

    if trt is not None and machine is not None and plan is not None:
        _tensorrt_stage(options, trt, machine, specs, plan, model_hash, manifest, summary)
        write_manifest(out_dir, manifest)
    return summary


def require_bf16(machine: MachineInfo) -> None:
    """EngineError unless `machine`'s GPU runs bf16 natively (compute capability 8.0 and
    up): FLUX engines build in bf16, and older GPUs have no bf16 kernels for TensorRT."""
    major = int(machine.compute_capability.split(".")[0])
    if major < 8:
        raise EngineError(
            f"FLUX engines build in bf16 (fp16 overflows in FLUX), which needs compute "
            f"capability 8.0 or newer; {machine.gpu_name} has {machine.compute_capability}: "
            "serve FLUX models on this GPU with --backend torch (fp32) or onnxruntime"
        )


def _folder_limits(options: BuildOptions) -> ModelLimits:
    """The model's request limits as `kiln serve` would read them from its folder alone."""
    from kiln_server.models.registry import make_spec

    spec = make_spec(options.model_name or options.model_path.name, options.model_path, {})
    return ModelLimits.of(spec)


def _onnx_stages(
    options: BuildOptions,
    target: BuildTarget,
    model_hash: str,
    manifest: Manifest,
    summary: BuildSummary,
) -> None:
    from kiln_build.export import export_component, export_request
    from kiln_build.graph_cleanup import cleanup_graph
    from kiln_build.validate import validate_graph, validation_requests

    specs, default = target.specs, target.default
    torch_modules = target.modules()
    names = list(specs)  # the family's component order, optional ones only when present
    out_dir = options.out_dir
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    try:
        cleaned: dict[str, Any] = {}
        start = time.perf_counter()
        for name in _stage(names, "export", options.progress, len(names)):
            with target.trace_context(name):
                raw = export_component(
                    specs[name],
                    torch_modules[name],
                    staging / "raw" / name / f"{name}.onnx",
                    request=export_request(default),
                    opset=options.opset,
                )
            cleaned[name] = cleanup_graph(specs[name], raw.path, staging / f"{name}.onnx")
            summary.node_counts[name] = (cleaned[name].nodes_before, cleaned[name].nodes_after)
        summary.export_seconds = time.perf_counter() - start

        checks: dict[str, list[dict[str, object]]] = {name: [] for name in names}
        if options.validate:
            start = time.perf_counter()
            for name in _stage(names, "validate", options.progress, len(names)):
                results = validate_graph(
                    specs[name],
                    torch_modules[name],
                    cleaned[name].path,
                    validation_requests(specs[name], default, target.size_multiple),
                    rtol=options.rtol,
                )
                checks[name] = [c.to_json() for c in results]
            summary.validate_seconds = time.perf_counter() - start

        for stale in set(manifest.onnx) - set(names):
            del manifest.onnx[stale]  # e.g. a preview decoder the model no longer names
        for name in names:
            report = cleaned[name]
            graph = out_dir / f"{name}.onnx"
            external = None
            if report.external_data is not None:
                external = out_dir / report.external_data.name
                os.replace(report.external_data, external)
            os.replace(report.path, graph)
            manifest.onnx[name] = OnnxComponent(
                name=name,
                file=graph.name,
                sha256=file_sha256(graph),
                size_bytes=graph.stat().st_size,
                opset=options.opset,
                model_content_hash=model_hash,
                inputs=tensor_entries(specs[name].inputs),
                outputs=tensor_entries(specs[name].outputs),
                validated=checks[name],
                external_data=external.name if external else None,
                external_data_bytes=external.stat().st_size if external else 0,
            )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _tensorrt_stage(
    options: BuildOptions,
    trt: Any,
    machine: MachineInfo,
    specs: dict[str, ComponentSpec],
    plan: ProfilePlan,
    model_hash: str,
    manifest: Manifest,
    summary: BuildSummary,
) -> None:
    from kiln_build.numerics import check_engine_numerics
    from kiln_build.tensorrt_build import (
        BuildResult,
        build_engine,
        engine_file_name,
        timing_cache_name,
    )
    from kiln_server.engines.engine_numerics import NumericsRecord, numerics_failure

    out_dir = options.out_dir
    cache = options.timing_cache or out_dir / timing_cache_name(machine)
    built: dict[str, tuple[BuildResult, NumericsRecord | None]] = {}
    staging = Path(tempfile.mkdtemp(prefix=".staging-trt-", dir=out_dir))
    start = time.perf_counter()
    try:
        names = list(specs)
        for name in _stage(names, "build", options.progress, len(names)):
            spec = specs[name]
            onnx_path = out_dir / manifest.onnx[name].file
            ranges = component_profiles(spec, plan)
            result = build_engine(
                trt,
                spec,
                onnx_path,
                staging / engine_file_name(name, machine),
                ranges,
                timing_cache=cache,
                workspace_bytes=options.workspace_bytes,
                refittable=options.refittable,
            )
            numerics = None
            if options.numerics_check:
                numerics = check_engine_numerics(
                    spec, onnx_path, result.path, ranges, result.precision
                )
                summary.numerics[name] = numerics.describe()
                if not numerics.passed:
                    raise EngineError(numerics_failure(name, result.precision, numerics))
            built[name] = (result, numerics)
        components: dict[str, TensorRTComponent] = {}
        for name, (result, numerics) in built.items():
            target = out_dir / result.path.name
            os.replace(result.path, target)
            components[name] = TensorRTComponent(
                name=name,
                file=target.name,
                sha256=file_sha256(target),
                size_bytes=target.stat().st_size,
                model_content_hash=model_hash,
                onnx_sha256=manifest.onnx[name].sha256,
                precision=result.precision,
                refittable=result.refittable,
                inputs=tensor_entries(specs[name].inputs),
                outputs=tensor_entries(specs[name].outputs),
                profiles=result.profiles,
                numerics=numerics,
            )
            summary.file_sizes[target.name] = target.stat().st_size
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary.tensorrt_seconds = time.perf_counter() - start
    manifest.build_args = tensorrt_build_args(options)
    manifest.replace_tensorrt_build(
        TensorRTBuild(machine=machine, components=components, timing_cache=cache.name)
    )


def tensorrt_build_args(options: BuildOptions) -> list[str]:
    """The `kiln build-engines` flags that shaped the engines, for the manifest's rebuild hint.

    The profile flags as given, and `--refittable` when the engines are refittable (the
    numerics check does not change the engines, so its flag is not repeated).
    """
    return options.flags.as_args() + (["--refittable"] if options.refittable else [])
