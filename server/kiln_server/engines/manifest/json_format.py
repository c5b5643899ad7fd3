"""The manifest as JSON: `manifest.json` read (every field checked, errors naming the field
and the rebuild command) and written atomically."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kiln_server.atomic_files import write_atomic
from kiln_server.engines.base import EngineError
from kiln_server.engines.components import ShapeRange, ShapeRequest
from kiln_server.engines.engine_numerics import NumericsRecord, numerics_from_json
from kiln_server.engines.manifest.commands import build_command
from kiln_server.engines.manifest.records import (
    MANIFEST_NAME,
    MANIFEST_VERSION,
    LoraRecord,
    MachineInfo,
    Manifest,
    ModelRecord,
    OnnxComponent,
    TensorEntry,
    TensorRTBuild,
    TensorRTComponent,
)


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
