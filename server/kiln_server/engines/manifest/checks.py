"""Checks of an engines directory against the served model and this machine, before
anything is loaded: model content hash, graph interfaces, file sizes and hashes, and for
TensorRT the machine. Each mismatch raises EngineError naming the differing value and the
`kiln build-engines` command that fixes it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from kiln_server.engines.base import EngineError
from kiln_server.engines.components import ComponentSpec
from kiln_server.engines.manifest.commands import build_command
from kiln_server.engines.manifest.records import (
    MachineInfo,
    Manifest,
    OnnxComponent,
    TensorEntry,
    TensorRTComponent,
    machine_mismatches,
    tensor_entries,
)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def interface_mismatch(
    spec: ComponentSpec, inputs: Sequence[TensorEntry], outputs: Sequence[TensorEntry]
) -> str | None:
    """How a recorded graph interface differs from the current declaration, or None."""
    expected_in = tensor_entries(spec.inputs)
    expected_out = tensor_entries(spec.outputs)
    for kind, got, want in (("inputs", inputs, expected_in), ("outputs", outputs, expected_out)):
        if tuple(got) != want:
            got_text = ", ".join(f"{t.name}:{t.dtype}{list(t.dims)}" for t in got)
            want_text = ", ".join(f"{t.name}:{t.dtype}{list(t.dims)}" for t in want)
            return f"its {kind} are [{got_text}] but this model needs [{want_text}]"
    return None


@dataclass(frozen=True)
class CheckContext:
    """What the engines are checked against: the served model and the fix command."""

    engines_dir: Path
    model_hash: str
    model_path: Path
    model_name: str | None = None

    def fix(self, manifest: Manifest, fmt: str) -> str:
        """The command that rebuilds `fmt` engines for the served model into the dir
        (with the LoRA inputs they were built with, if any)."""
        extra = list(manifest.build_args) if fmt == "tensorrt" else []
        if manifest.lora is not None:
            extra += manifest.lora.as_args()
        return build_command(
            fmt,
            self.engines_dir,
            model_name=self.model_name,
            config=manifest.config,
            extra_args=extra,
        )


def _check_model_hash(
    manifest: Manifest, component: str, recorded: str, ctx: CheckContext, fmt: str
) -> None:
    if recorded != ctx.model_hash:
        raise EngineError(
            f"{fmt} engine {component!r} in {ctx.engines_dir} was built from another model: "
            f"model content hash {recorded[:16]}… (built from {manifest.model.path}) but the "
            f"served model {ctx.model_path} has content hash {ctx.model_hash[:16]}…; "
            f"rebuild with: {ctx.fix(manifest, fmt)}"
        )


def _check_file(
    ctx: CheckContext,
    manifest: Manifest,
    fmt: str,
    component: str,
    file: str,
    size: int,
    sha256: str,
    verify_hash: bool,
) -> Path:
    path = ctx.engines_dir / file
    if Path(file).is_absolute() or ".." in Path(file).parts:
        raise EngineError(
            f"engine manifest in {ctx.engines_dir} names {file!r} for {component!r}, outside "
            f"the directory; rebuild with: {ctx.fix(manifest, fmt)}"
        )
    if not path.is_file():
        raise EngineError(
            f"{fmt} engine file {path} for {component!r} is missing; "
            f"rebuild with: {ctx.fix(manifest, fmt)}"
        )
    actual = path.stat().st_size
    if actual != size:
        raise EngineError(
            f"{fmt} engine file {path} for {component!r} is corrupt: {actual} bytes, the "
            f"manifest records {size}; rebuild with: {ctx.fix(manifest, fmt)}"
        )
    if verify_hash and file_sha256(path) != sha256:
        raise EngineError(
            f"{fmt} engine file {path} for {component!r} is corrupt: its SHA-256 differs from "
            f"the manifest's; rebuild with: {ctx.fix(manifest, fmt)}"
        )
    return path


def _missing_component(ctx: CheckContext, manifest: Manifest, fmt: str, name: str) -> EngineError:
    return EngineError(
        f"{ctx.engines_dir} has no {fmt} engine for component {name!r}; "
        f"rebuild with: {ctx.fix(manifest, fmt)}"
    )


_Entry = TypeVar("_Entry", OnnxComponent, TensorRTComponent)


def _recorded(
    entries: Mapping[str, _Entry],
    specs: Mapping[str, ComponentSpec],
    required: Sequence[str],
    ctx: CheckContext,
    manifest: Manifest,
    fmt: str,
) -> Iterator[tuple[str, ComponentSpec, _Entry]]:
    """(name, declaration, manifest record) of each declared component that was built.

    Raises the missing-component error for a required component with no record.
    """
    for name, spec in specs.items():
        entry = entries.get(name)
        if entry is not None:
            yield name, spec, entry
        elif name in required:
            raise _missing_component(ctx, manifest, fmt, name)


def _check_component(
    ctx: CheckContext,
    manifest: Manifest,
    fmt: str,
    label: str,
    spec: ComponentSpec,
    entry: OnnxComponent | TensorRTComponent,
    verify_hash: bool,
) -> Path:
    """Check one record's model hash, interface and file; return the file's path.

    `label` names the kind of file in messages ("onnx graph", "TensorRT engine").
    """
    name = spec.name
    _check_model_hash(manifest, name, entry.model_content_hash, ctx, fmt)
    problem = interface_mismatch(spec, entry.inputs, entry.outputs)
    if problem:
        raise EngineError(
            f"{label} {name!r} in {ctx.engines_dir} does not fit this model: {problem}; "
            f"rebuild with: {ctx.fix(manifest, fmt)}"
        )
    return _check_file(
        ctx, manifest, fmt, name, entry.file, entry.size_bytes, entry.sha256, verify_hash
    )


def check_onnx_engines(
    manifest: Manifest,
    specs: Mapping[str, ComponentSpec],
    ctx: CheckContext,
    *,
    required: Sequence[str],
    verify_hash: bool = True,
) -> dict[str, Path]:
    """Check the ONNX section for the served model; return the graph file of each component.

    Components in `required` must be present; other declared components are returned when
    present. Raises EngineError naming the differing value and the fix command on a model
    hash mismatch, an interface that differs from the declaration, or a missing/corrupt file.
    """
    if not manifest.onnx:
        raise EngineError(
            f"{ctx.engines_dir} holds no ONNX graphs; build them with: {ctx.fix(manifest, 'onnx')}"
        )
    files: dict[str, Path] = {}
    for name, spec, entry in _recorded(manifest.onnx, specs, required, ctx, manifest, "onnx"):
        files[name] = _check_component(
            ctx, manifest, "onnx", "onnx graph", spec, entry, verify_hash
        )
        if entry.external_data is not None:
            # Weights beside the graph: checked by size (hashing gigabytes adds little).
            _check_file(
                ctx,
                manifest,
                "onnx",
                name,
                entry.external_data,
                entry.external_data_bytes,
                "",
                verify_hash=False,
            )
    return files


def check_tensorrt_engines(
    manifest: Manifest,
    specs: Mapping[str, ComponentSpec],
    ctx: CheckContext,
    machine: MachineInfo,
    *,
    required: Sequence[str],
    verify_hash: bool = True,
) -> dict[str, tuple[Path, TensorRTComponent]]:
    """Check the TensorRT build for this machine; return each component's file and record.

    Raises EngineError when no build matches `machine` (naming every differing value of the
    closest build: GPU, compute capability, TensorRT or CUDA version), when the model hash or
    interface differs, or when an engine file is missing or corrupt; each message ends with
    the `kiln build-engines` command that fixes it.
    """
    fix = ctx.fix(manifest, "tensorrt")
    if not manifest.tensorrt:
        raise EngineError(
            f"{ctx.engines_dir} holds no TensorRT engines; build them on this machine with: {fix}"
        )
    build = manifest.tensorrt_build_for(machine)
    if build is None:
        closest = min(manifest.tensorrt, key=lambda b: len(machine_mismatches(b.machine, machine)))
        differences = "; ".join(machine_mismatches(closest.machine, machine))
        raise EngineError(
            f"TensorRT engines in {ctx.engines_dir} were built for another machine: {differences}. "
            "TensorRT engines only run on the GPU model and TensorRT version they were built "
            f"with; rebuild on this machine with: {fix}"
        )
    found: dict[str, tuple[Path, TensorRTComponent]] = {}
    for name, spec, entry in _recorded(
        build.components, specs, required, ctx, manifest, "tensorrt"
    ):
        path = _check_component(
            ctx, manifest, "tensorrt", "TensorRT engine", spec, entry, verify_hash
        )
        found[name] = (path, entry)
    return found
