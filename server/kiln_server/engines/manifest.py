"""The engine manifest: what was built, from which model, for which machine; and its checks.

`build-engines` writes `manifest.json` beside the engine files. The server reads it and
checks it against the model it serves and the machine it runs on before it loads anything,
so the usual TensorRT failures ("engine plan file is generated on an incompatible device",
"version tag does not match") become one clear message that names the differing value and
the `kiln build-engines` command that fixes it.

Layout: one `onnx` section (the graphs are portable) and a list of `tensorrt` builds, one per
machine (GPU, compute capability, TensorRT and CUDA versions): engine file names carry the
machine, so builds for two GPUs live side by side in one directory. Each TensorRT engine
also records whether it is refittable and how it compared with onnxruntime after the build
(`numerics`, see engine_numerics.py).
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kiln_server.atomic_files import write_atomic
from kiln_server.engines.base import EngineError
from kiln_server.engines.components import ComponentSpec, ShapeRange, ShapeRequest
from kiln_server.engines.engine_numerics import NumericsRecord, numerics_from_json

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
INSTALL_TENSORRT = "pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu12"


# --------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class TensorEntry:
    """A tensor of a built graph as recorded: name, dtype and declared dims."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]


@dataclass(frozen=True)
class MachineInfo:
    """What a TensorRT engine is tied to: GPU model, compute capability, library versions."""

    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    cuda_version: str

    def describe(self) -> str:
        """One line naming every field, for messages."""
        return (
            f"{self.gpu_name}, compute capability {self.compute_capability}, "
            f"TensorRT {self.tensorrt_version}, CUDA {self.cuda_version}"
        )


@dataclass(frozen=True)
class ModelRecord:
    """The model the engines were built from: registry name (if any), folder, content hash."""

    name: str | None
    path: str
    content_hash: str


@dataclass
class OnnxComponent:
    """One exported ONNX graph."""

    name: str
    file: str
    sha256: str
    size_bytes: int
    opset: int
    model_content_hash: str
    inputs: tuple[TensorEntry, ...]
    outputs: tuple[TensorEntry, ...]
    # Shapes the graph was checked against torch at, with the worst relative error seen.
    validated: list[dict[str, Any]] = field(default_factory=list)
    # Weights of graphs over 2 GB live in one file beside the graph.
    external_data: str | None = None
    external_data_bytes: int = 0


@dataclass
class TensorRTComponent:
    """One serialized TensorRT engine."""

    name: str
    file: str
    sha256: str
    size_bytes: int
    model_content_hash: str
    onnx_sha256: str
    precision: str
    refittable: bool
    inputs: tuple[TensorEntry, ...]
    outputs: tuple[TensorEntry, ...]
    profiles: tuple[ShapeRange, ...]
    # The engine compared with onnxruntime after the build; None when the check was skipped.
    numerics: NumericsRecord | None = None


@dataclass
class TensorRTBuild:
    """The engines built on one kind of machine."""

    machine: MachineInfo
    components: dict[str, TensorRTComponent]
    timing_cache: str | None = None


@dataclass(frozen=True)
class LoraRecord:
    """The per-row LoRA inputs the UNet graph was built with (`kiln build-engines
    --lora-slots N --max-lora-rank R --max-loras-per-request K`): the server settings
    `lora_slots`, `max_lora_rank` and `max_loras_per_request` it serves LoRAs with."""

    slots: int
    max_rank: int
    max_loras: int

    def as_args(self) -> list[str]:
        """The `kiln build-engines` flags that build these inputs."""
        return [
            "--lora-slots",
            str(self.slots),
            "--max-lora-rank",
            str(self.max_rank),
            "--max-loras-per-request",
            str(self.max_loras),
        ]


@dataclass
class Manifest:
    """Everything `build-engines` wrote into one engines directory."""

    model: ModelRecord
    onnx: dict[str, OnnxComponent] = field(default_factory=dict)
    tensorrt: list[TensorRTBuild] = field(default_factory=list)
    # Extra `build-engines` flags the engines were built with (profiles), for rebuild hints.
    build_args: list[str] = field(default_factory=list)
    # The `--config` file that defined the model's name, when one was used.
    config: str | None = None
    # The UNet graph's per-row LoRA inputs; None: built without LoRA support.
    lora: LoraRecord | None = None
    version: int = MANIFEST_VERSION

    def tensorrt_build_for(self, machine: MachineInfo) -> TensorRTBuild | None:
        """The TensorRT build made on a machine identical to `machine`, if any."""
        for build in self.tensorrt:
            if not machine_mismatches(build.machine, machine):
                return build
        return None

    def replace_tensorrt_build(self, build: TensorRTBuild) -> None:
        """Add `build`, replacing an earlier build for the same machine."""
        self.tensorrt = [b for b in self.tensorrt if b.machine != build.machine] + [build]


def tensor_entries(tensors: Iterable[Any]) -> tuple[TensorEntry, ...]:
    """TensorEntry records for declared TensorSpecs."""
    return tuple(TensorEntry(t.name, t.dtype, tuple(t.dims)) for t in tensors)


# --------------------------------------------------------------------------- JSON


def _range_to_json(r: ShapeRange) -> dict[str, Any]:
    return {"min": asdict(r.min), "opt": asdict(r.opt), "max": asdict(r.max)}


def _component_to_json(component: OnnxComponent | TensorRTComponent) -> dict[str, Any]:
    data = asdict(component)
    if isinstance(component, TensorRTComponent):
        data["profiles"] = [_range_to_json(r) for r in component.profiles]
        data["numerics"] = component.numerics.to_json() if component.numerics else None
    return data


def _lists(value: Any) -> Any:
    """`value` with every tuple turned into a list, recursively (JSON's own shapes)."""
    if isinstance(value, list | tuple):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


def manifest_to_json(manifest: Manifest) -> dict[str, Any]:
    """The manifest as a JSON-ready dict (lists, dicts, strings, numbers, booleans, None)."""
    data: dict[str, Any] = {
        "version": manifest.version,
        "model": asdict(manifest.model),
        "build_args": list(manifest.build_args),
        "config": manifest.config,
        "lora": asdict(manifest.lora) if manifest.lora is not None else None,
        "onnx": {name: _component_to_json(c) for name, c in manifest.onnx.items()},
        "tensorrt": [
            {
                "machine": asdict(build.machine),
                "timing_cache": build.timing_cache,
                "components": {n: _component_to_json(c) for n, c in build.components.items()},
            }
            for build in manifest.tensorrt
        ],
    }
    return _lists(data)


class _Reader:
    """Typed access to parsed JSON that turns any structural problem into one EngineError."""

    def __init__(self, source: Path, fix: str) -> None:
        self.source = source
        self.fix = fix

    def fail(self, where: str, problem: str) -> EngineError:
        return EngineError(
            f"engine manifest {self.source} is corrupt: {where} {problem}; rebuild with: {self.fix}"
        )

    def obj(self, data: Any, where: str) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise self.fail(where, "is not an object")
        return data

    def get(self, data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
        if key not in data:
            raise self.fail(where, f"lacks {key!r}")
        value = data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(f"{where}.{key}", "has the wrong type")
        return value

    def tensors(self, data: Any, where: str) -> tuple[TensorEntry, ...]:
        if not isinstance(data, list):
            raise self.fail(where, "is not a list")
        entries = []
        for i, item in enumerate(data):
            item = self.obj(item, f"{where}[{i}]")
            dims = self.get(item, "dims", list, f"{where}[{i}]")
            if not all(isinstance(d, int | str) for d in dims):
                raise self.fail(f"{where}[{i}].dims", "has the wrong type")
            entries.append(
                TensorEntry(
                    self.get(item, "name", str, f"{where}[{i}]"),
                    self.get(item, "dtype", str, f"{where}[{i}]"),
                    tuple(dims),
                )
            )
        return tuple(entries)

    def request(self, data: Any, where: str) -> ShapeRequest:
        data = self.obj(data, where)
        return ShapeRequest(
            batch=self.get(data, "batch", int, where),
            height=self.get(data, "height", int, where),
            width=self.get(data, "width", int, where),
        )

    def shape_range(self, data: Any, where: str) -> ShapeRange:
        data = self.obj(data, where)
        return ShapeRange(
            min=self.request(data.get("min"), f"{where}.min"),
            opt=self.request(data.get("opt"), f"{where}.opt"),
            max=self.request(data.get("max"), f"{where}.max"),
        )


def _optional_str(r: _Reader, data: dict[str, Any], key: str, where: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise r.fail(f"{where}.{key}", "has the wrong type")
    return value


def _numerics(r: _Reader, data: Any, where: str) -> NumericsRecord | None:
    if data is None:
        return None
    try:
        return numerics_from_json(data)
    except ValueError as exc:
        raise r.fail(f"{where}.numerics", str(exc)) from None


def manifest_from_json(data: Any, source: Path, fix: str | None = None) -> Manifest:
    """Parse a manifest dict; EngineError naming the field when anything is malformed."""
    r = _Reader(source, fix or build_command("onnx", source.parent))
    data = r.obj(data, "the manifest")
    version = r.get(data, "version", int, "the manifest")
    if version != MANIFEST_VERSION:
        raise EngineError(
            f"engine manifest {source} has format version {version}, this Kiln reads version "
            f"{MANIFEST_VERSION}; rebuild with: {r.fix}"
        )
    model_data = r.obj(data.get("model"), "model")
    name = model_data.get("name")
    if name is not None and not isinstance(name, str):
        raise r.fail("model.name", "has the wrong type")
    model = ModelRecord(
        name=name,
        path=r.get(model_data, "path", str, "model"),
        content_hash=r.get(model_data, "content_hash", str, "model"),
    )
    onnx: dict[str, OnnxComponent] = {}
    for cname, item in r.obj(data.get("onnx", {}), "onnx").items():
        where = f"onnx.{cname}"
        item = r.obj(item, where)
        onnx[cname] = OnnxComponent(
            name=r.get(item, "name", str, where),
            file=r.get(item, "file", str, where),
            sha256=r.get(item, "sha256", str, where),
            size_bytes=r.get(item, "size_bytes", int, where),
            opset=r.get(item, "opset", int, where),
            model_content_hash=r.get(item, "model_content_hash", str, where),
            inputs=r.tensors(item.get("inputs"), f"{where}.inputs"),
            outputs=r.tensors(item.get("outputs"), f"{where}.outputs"),
            validated=list(item.get("validated") or []),
            external_data=_optional_str(r, item, "external_data", where),
            external_data_bytes=int(item.get("external_data_bytes") or 0),
        )
    builds: list[TensorRTBuild] = []
    trt_data = data.get("tensorrt", [])
    if not isinstance(trt_data, list):
        raise r.fail("tensorrt", "is not a list")
    for index, build_data in enumerate(trt_data):
        where = f"tensorrt[{index}]"
        build_data = r.obj(build_data, where)
        machine_data = r.obj(build_data.get("machine"), f"{where}.machine")
        machine = MachineInfo(
            gpu_name=r.get(machine_data, "gpu_name", str, f"{where}.machine"),
            compute_capability=r.get(machine_data, "compute_capability", str, f"{where}.machine"),
            tensorrt_version=r.get(machine_data, "tensorrt_version", str, f"{where}.machine"),
            cuda_version=r.get(machine_data, "cuda_version", str, f"{where}.machine"),
        )
        components: dict[str, TensorRTComponent] = {}
        for cname, item in r.obj(build_data.get("components"), f"{where}.components").items():
            cwhere = f"{where}.components.{cname}"
            item = r.obj(item, cwhere)
            profiles = r.get(item, "profiles", list, cwhere)
            components[cname] = TensorRTComponent(
                name=r.get(item, "name", str, cwhere),
                file=r.get(item, "file", str, cwhere),
                sha256=r.get(item, "sha256", str, cwhere),
                size_bytes=r.get(item, "size_bytes", int, cwhere),
                model_content_hash=r.get(item, "model_content_hash", str, cwhere),
                onnx_sha256=r.get(item, "onnx_sha256", str, cwhere),
                precision=r.get(item, "precision", str, cwhere),
                refittable=r.get(item, "refittable", bool, cwhere),
                inputs=r.tensors(item.get("inputs"), f"{cwhere}.inputs"),
                outputs=r.tensors(item.get("outputs"), f"{cwhere}.outputs"),
                profiles=tuple(
                    r.shape_range(p, f"{cwhere}.profiles[{i}]") for i, p in enumerate(profiles)
                ),
                numerics=_numerics(r, item.get("numerics"), cwhere),
            )
        cache = build_data.get("timing_cache")
        builds.append(
            TensorRTBuild(
                machine=machine,
                components=components,
                timing_cache=cache if isinstance(cache, str) else None,
            )
        )
    build_args = data.get("build_args", [])
    if not isinstance(build_args, list) or not all(isinstance(a, str) for a in build_args):
        raise r.fail("build_args", "is not a list of strings")
    return Manifest(
        model=model,
        onnx=onnx,
        tensorrt=builds,
        build_args=build_args,
        config=_optional_str(r, data, "config", "the manifest"),
        lora=_lora_record(r, data.get("lora")),
    )


def _lora_record(r: _Reader, data: Any) -> LoraRecord | None:
    if data is None:
        return None
    data = r.obj(data, "lora")
    record = LoraRecord(
        slots=r.get(data, "slots", int, "lora"),
        max_rank=r.get(data, "max_rank", int, "lora"),
        max_loras=r.get(data, "max_loras", int, "lora"),
    )
    if min(record.slots, record.max_rank, record.max_loras) < 1:
        raise r.fail("lora", "has a value below 1")
    return record


def read_manifest(engines_dir: Path, fix: str | None = None) -> Manifest:
    """Read `engines_dir/manifest.json`; EngineError when missing, unreadable or malformed.

    `fix` is the command the messages recommend (default: an ONNX build for the model the
    directory is named after).
    """
    fix = fix or build_command("onnx", engines_dir)
    path = engines_dir / MANIFEST_NAME
    if not engines_dir.is_dir():
        raise EngineError(f"engines directory {engines_dir} does not exist; build with: {fix}")
    if not path.is_file():
        raise EngineError(
            f"{engines_dir} has no {MANIFEST_NAME} (it was not written by `kiln build-engines`);"
            f" build with: {fix}"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineError(
            f"engine manifest {path} is corrupt ({exc}); rebuild with: {fix}"
        ) from exc
    return manifest_from_json(data, path, fix)


def write_manifest(engines_dir: Path, manifest: Manifest) -> Path:
    """Write the manifest atomically (temporary file, then rename) and return its path."""
    path = engines_dir / MANIFEST_NAME
    write_atomic(path, json.dumps(manifest_to_json(manifest), indent=2) + "\n")
    return path


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- comparisons


def build_command(
    fmt: str,
    engines_dir: Path,
    *,
    model_name: str | None = None,
    config: str | None = None,
    extra_args: Sequence[str] = (),
) -> str:
    """The `kiln build-engines` command line that (re)builds `fmt` engines into `engines_dir`.

    Engines of model NAME live in <root>/NAME/ (the layout `kiln serve --engines <root>`
    reads), so the command is `--model NAME --out <root>`, with NAME defaulting to the
    directory's name; `config` adds the `--config` file that defines NAME.
    """
    parts = ["kiln", "build-engines"]
    if config:
        parts += ["--config", config]
    parts += ["--model", model_name or engines_dir.name, "--format", fmt]
    parts += ["--out", str(engines_dir.parent), *extra_args]
    return shlex.join(parts)


def cuda_major(version: str) -> str:
    """Major CUDA version of a version string ("12.4" -> "12")."""
    return version.split(".", 1)[0]


def machine_mismatches(built: MachineInfo, here: MachineInfo) -> list[str]:
    """Each value that differs between the build machine and this one, as a phrase.

    GPU name, compute capability and the exact TensorRT version must match; CUDA must match
    in its major version (TensorRT engines are tied to the CUDA major release).
    """
    problems = []
    if built.gpu_name != here.gpu_name:
        problems.append(f"GPU {built.gpu_name!r} (this machine has {here.gpu_name!r})")
    if built.compute_capability != here.compute_capability:
        problems.append(
            f"compute capability {built.compute_capability} "
            f"(this machine has {here.compute_capability})"
        )
    if built.tensorrt_version != here.tensorrt_version:
        problems.append(
            f"TensorRT version {built.tensorrt_version} (this machine has {here.tensorrt_version})"
        )
    if cuda_major(built.cuda_version) != cuda_major(here.cuda_version):
        problems.append(f"CUDA version {built.cuda_version} (this machine has {here.cuda_version})")
    return problems


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
