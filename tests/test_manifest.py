"""The engine manifest guards serving: mismatched, missing or corrupt engines are refused.

Every refusal is an EngineError whose message names the differing value and the exact
`kiln build-engines` command that fixes it; nothing is loaded before the checks pass.
TensorRT builds are checked against a described machine, so these run without a GPU.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_export_support import MODEL_NAME, copy_engines, tiny_engines

from kiln_server.engines.base import EngineError
from kiln_server.engines.components import ShapeRange, ShapeRequest, sdxl_component_specs
from kiln_server.engines.engine_numerics import NumericsRecord, judge_numerics
from kiln_server.engines.manifest import (
    CheckContext,
    MachineInfo,
    Manifest,
    TensorRTBuild,
    TensorRTComponent,
    check_tensorrt_engines,
    machine_mismatches,
    manifest_from_json,
    manifest_to_json,
    read_manifest,
    tensor_entries,
    write_manifest,
)

H100 = MachineInfo("NVIDIA H100 80GB HBM3", "9.0", "10.3.0", "12.4")


@pytest.fixture(scope="session")
def engines_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Path:
    return tiny_engines(tmp_path_factory, tiny_model_path)


@pytest.fixture
def engines(engines_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the engines, free to tamper with."""
    return copy_engines(engines_dir, tmp_path / "engines")


@pytest.fixture(scope="module")
def files(tiny_model_path: Path) -> Any:
    from kiln_server.models.loader import read_model_files

    return read_model_files(tiny_model_path)


def edit_manifest(engines: Path, edit: Any) -> None:
    path = engines / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def fix_command(engines: Path, fmt: str = "onnx", extra: str = "") -> str:
    return f"kiln build-engines --model {MODEL_NAME} --format {fmt} --out {engines.parent}{extra}"


def numerics_for(name: str) -> NumericsRecord | None:
    """A comparison record per component (none for the VAE encoder: a skipped check)."""
    if name == "vae_encoder":
        return None
    shapes = [ShapeRequest(2, 64, 64), ShapeRequest(1, 32, 32)]
    return judge_numerics(
        [(shapes[0], {"out": (3e-3, 0.01)}), (shapes[1], {"out": (5e-3, 0.002)})], "fp16"
    )


def add_tensorrt_build(engines: Path, files: Any, machine: MachineInfo) -> Manifest:
    """Record a TensorRT build for `machine` (plan files are stand-ins: no GPU here)."""
    manifest = read_manifest(engines)
    specs = sdxl_component_specs(files.dims)
    components = {}
    for name, spec in specs.items():
        plan = engines / f"{name}.test.plan"
        plan.write_bytes(b"plan " + name.encode())
        from kiln_server.engines.manifest import file_sha256

        components[name] = TensorRTComponent(
            name=name,
            file=plan.name,
            sha256=file_sha256(plan),
            size_bytes=plan.stat().st_size,
            model_content_hash=manifest.model.content_hash,
            onnx_sha256=manifest.onnx[name].sha256,
            precision="fp16",
            refittable=True,
            inputs=tensor_entries(spec.inputs),
            outputs=tensor_entries(spec.outputs),
            profiles=(
                ShapeRange(
                    ShapeRequest(2, 64, 64), ShapeRequest(2, 64, 64), ShapeRequest(2, 64, 64)
                ),
            ),
            numerics=numerics_for(name),
        )
    manifest.replace_tensorrt_build(TensorRTBuild(machine=machine, components=components))
    manifest.build_args = ["--batch-sizes", "1,2"]
    write_manifest(engines, manifest)
    return manifest


def check_trt(engines: Path, files: Any, machine: MachineInfo) -> Any:
    from kiln_server.models.loader import model_content_hash

    ctx = CheckContext(engines, model_content_hash(files.path), files.path)
    return check_tensorrt_engines(
        read_manifest(engines),
        sdxl_component_specs(files.dims),
        ctx,
        machine,
        required=("text_encoder", "text_encoder_2", "unet", "vae_decoder"),
    )


# ------------------------------------------------------------------ ONNX, through the loader


def test_intact_engines_load(engines: Path, files: Any) -> None:
    from kiln_server.engines.loading import load_engine_set

    engine_set = load_engine_set("onnxruntime", files, engines)
    assert engine_set.backend == "onnxruntime"
    assert engine_set.vae_encoder is not None


def test_manifest_round_trips_through_json(engines: Path, files: Any) -> None:
    manifest = add_tensorrt_build(engines, files, H100)
    again = manifest_from_json(manifest_to_json(manifest), engines / "manifest.json")
    assert again == manifest
    assert read_manifest(engines) == manifest


def test_numerics_records_round_trip_through_the_manifest(engines: Path, files: Any) -> None:
    add_tensorrt_build(engines, files, H100)
    data = json.loads((engines / "manifest.json").read_text())
    unet = data["tensorrt"][0]["components"]["unet"]["numerics"]
    assert unet == {
        "reference": "onnxruntime",
        "shapes": [
            {"batch": 2, "height": 64, "width": 64},
            {"batch": 1, "height": 32, "width": 32},
        ],
        "max_abs_error": 0.01,
        "max_rel_error": 5e-3,
        "worst_output": "out",
        "worst_shape": {"batch": 1, "height": 32, "width": 32},
        "tolerance": 2e-2,
        "passed": True,
    }
    assert data["tensorrt"][0]["components"]["vae_encoder"]["numerics"] is None
    build = read_manifest(engines).tensorrt[0]
    assert build.components["unet"].numerics == numerics_for("unet")
    assert build.components["vae_encoder"].numerics is None


def test_a_non_finite_comparison_is_kept_as_valid_json(engines: Path, files: Any) -> None:
    manifest = add_tensorrt_build(engines, files, H100)
    failed = judge_numerics([(ShapeRequest(1, 64, 64), {"images": (float("inf"), 1.0)})], "fp32")
    manifest.tensorrt[0].components["vae_decoder"].numerics = failed
    write_manifest(engines, manifest)
    text = (engines / "manifest.json").read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    again = read_manifest(engines).tensorrt[0].components["vae_decoder"].numerics
    assert again == failed and again is not None
    assert again.max_rel_error == float("inf") and not again.passed


def test_manifests_without_numerics_still_read(engines: Path, files: Any) -> None:
    """Manifests written before the check existed have no `numerics`: not compared."""
    add_tensorrt_build(engines, files, H100)
    edit_manifest(
        engines,
        lambda d: [c.pop("numerics") for c in d["tensorrt"][0]["components"].values()],
    )
    build = read_manifest(engines).tensorrt[0]
    assert all(c.numerics is None for c in build.components.values())


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda n: n.pop("passed"), "numerics lacks 'passed'"),
        (
            lambda n: n.update(max_rel_error="small"),
            "numerics has the wrong type in 'max_rel_error'",
        ),
        (lambda n: n.update(passed=1), "numerics has the wrong type in 'passed'"),
        (lambda n: n.update(worst_shape={"batch": 1}), "wrong type in 'worst_shape'"),
    ],
)
def test_a_malformed_numerics_record_is_refused(
    engines: Path, files: Any, edit: Any, problem: str
) -> None:
    add_tensorrt_build(engines, files, H100)
    edit_manifest(engines, lambda d: edit(d["tensorrt"][0]["components"]["unet"]["numerics"]))
    with pytest.raises(EngineError) as error:
        read_manifest(engines)
    message = str(error.value)
    assert "is corrupt: tensorrt[0].components.unet." in message and problem in message


def test_another_model_hash_is_refused(engines: Path, files: Any) -> None:
    from kiln_server.engines.loading import load_engine_set

    edit_manifest(
        engines, lambda d: d["onnx"]["unet"].update(model_content_hash="0123456789abcdef" * 4)
    )
    with pytest.raises(EngineError) as error:
        load_engine_set("onnxruntime", files, engines)
    message = str(error.value)
    assert "'unet'" in message
    assert "model content hash 0123456789abcdef" in message
    assert f"served model {files.path}" in message
    assert message.endswith(fix_command(engines))


def test_missing_engine_file_is_refused(engines: Path, files: Any) -> None:
    from kiln_server.engines.loading import load_engine_set

    (engines / "vae_decoder.onnx").unlink()
    with pytest.raises(EngineError) as error:
        load_engine_set("onnxruntime", files, engines)
    assert str(error.value) == (
        f"onnx engine file {engines / 'vae_decoder.onnx'} for 'vae_decoder' is missing; "
        f"rebuild with: {fix_command(engines)}"
    )


def test_corrupt_engine_file_is_refused(engines: Path, files: Any) -> None:
    from kiln_server.engines.loading import load_engine_set

    graph = engines / "unet.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    graph.write_bytes(bytes(data))
    with pytest.raises(EngineError, match=r"unet.onnx for 'unet' is corrupt: its SHA-256 differs"):
        load_engine_set("onnxruntime", files, engines)
    graph.write_bytes(bytes(data[:100]))
    with pytest.raises(EngineError, match=r"is corrupt: 100 bytes, the manifest records \d+"):
        load_engine_set("onnxruntime", files, engines)


@pytest.mark.parametrize(
    ("content", "problem"),
    [("{not json", "is corrupt"), ('{"version": 1, "model": {}}', "model lacks 'path'")],
)
def test_corrupt_manifest_is_refused(engines: Path, files: Any, content: str, problem: str) -> None:
    from kiln_server.engines.loading import load_engine_set

    (engines / "manifest.json").write_text(content)
    with pytest.raises(EngineError) as error:
        load_engine_set("onnxruntime", files, engines)
    assert problem in str(error.value)
    assert str(error.value).endswith(fix_command(engines))


def test_missing_manifest_names_the_build_command(engines: Path, files: Any) -> None:
    from kiln_server.engines.loading import load_engine_set

    (engines / "manifest.json").unlink()
    with pytest.raises(EngineError, match=re.escape(f"build with: {fix_command(engines)}")):
        load_engine_set("onnxruntime", files, engines)
    with pytest.raises(EngineError, match="pass --engines DIR"):
        load_engine_set("onnxruntime", files, None)


def test_interface_change_is_refused(engines: Path, files: Any) -> None:
    from kiln_server.engines.loading import load_engine_set

    edit_manifest(engines, lambda d: d["onnx"]["unet"]["inputs"][1].update(dims=[1]))
    with pytest.raises(EngineError, match=r"its inputs are \[.*timestep:float32\[1\].*needs"):
        load_engine_set("onnxruntime", files, engines)


def test_fix_command_names_the_config_that_defines_the_model(engines: Path, files: Any) -> None:
    from kiln_server.engines.loading import load_engine_set

    (engines / "text_encoder.onnx").unlink()
    config = engines.parent / "kiln.toml"
    with pytest.raises(EngineError) as error:
        load_engine_set("onnxruntime", files, engines, config=config)
    assert str(error.value).endswith(
        f"kiln build-engines --config {config} --model {MODEL_NAME} --format onnx "
        f"--out {engines.parent}"
    )


# ------------------------------------------------------------------ TensorRT builds


def test_tensorrt_build_for_this_machine_passes(engines: Path, files: Any) -> None:
    add_tensorrt_build(engines, files, H100)
    found = check_trt(engines, files, H100)
    assert set(found) == set(sdxl_component_specs(files.dims))
    assert found["unet"][0] == engines / "unet.test.plan"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        (
            "gpu_name",
            "NVIDIA A100-SXM4-80GB",
            "GPU 'NVIDIA A100-SXM4-80GB' (this machine has 'NVIDIA H100 80GB HBM3')",
        ),
        ("compute_capability", "8.0", "compute capability 8.0 (this machine has 9.0)"),
        ("tensorrt_version", "10.1.0", "TensorRT version 10.1.0 (this machine has 10.3.0)"),
        ("cuda_version", "11.8", "CUDA version 11.8 (this machine has 12.4)"),
    ],
)
def test_tensorrt_build_for_another_machine_is_refused(
    engines: Path, files: Any, field: str, value: str, expected: str
) -> None:
    add_tensorrt_build(engines, files, replace(H100, **{field: value}))
    with pytest.raises(EngineError) as error:
        check_trt(engines, files, H100)
    message = str(error.value)
    assert f"built for another machine: {expected}." in message
    assert message.endswith(fix_command(engines, "tensorrt", " --batch-sizes 1,2"))


def test_tampered_tensorrt_model_hash_and_missing_plan_are_refused(
    engines: Path, files: Any
) -> None:
    add_tensorrt_build(engines, files, H100)
    edit_manifest(
        engines,
        lambda d: d["tensorrt"][0]["components"]["vae_decoder"].update(model_content_hash="f" * 64),
    )
    with pytest.raises(
        EngineError, match=r"tensorrt engine 'vae_decoder' .* model content hash ffff"
    ):
        check_trt(engines, files, H100)
    add_tensorrt_build(engines, files, H100)
    (engines / "unet.test.plan").unlink()
    with pytest.raises(EngineError) as error:
        check_trt(engines, files, H100)
    assert str(error.value) == (
        f"tensorrt engine file {engines / 'unet.test.plan'} for 'unet' is missing; "
        f"rebuild with: {fix_command(engines, 'tensorrt', ' --batch-sizes 1,2')}"
    )


def test_builds_for_two_machines_live_side_by_side(engines: Path, files: Any) -> None:
    a100 = MachineInfo("NVIDIA A100-SXM4-80GB", "8.0", "10.3.0", "12.4")
    add_tensorrt_build(engines, files, a100)
    add_tensorrt_build(engines, files, H100)
    manifest = read_manifest(engines)
    assert [b.machine for b in manifest.tensorrt] == [a100, H100]
    assert manifest.tensorrt_build_for(H100) is manifest.tensorrt[1]
    check_trt(engines, files, H100)


def test_machine_comparison_allows_cuda_minor_updates() -> None:
    assert machine_mismatches(H100, replace(H100, cuda_version="12.6")) == []
    assert len(machine_mismatches(H100, MachineInfo("RTX 4090", "8.9", "10.0.1", "11.8"))) == 4


def test_tensorrt_backend_without_tensorrt_stops_with_install_hint(
    engines: Path, files: Any
) -> None:
    from kiln_server.engines.loading import load_engine_set
    from kiln_server.engines.machine import tensorrt_missing

    if not tensorrt_missing():
        pytest.skip("TensorRT and CUDA are available here")
    with pytest.raises(EngineError) as error:
        load_engine_set("tensorrt", files, engines)
    message = str(error.value)
    assert message.startswith("cannot serve with --backend tensorrt: this machine lacks")
    assert "pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu12" in message


def test_resolve_backend_picks_the_fastest_available(engines: Path, files: Any) -> None:
    from kiln_server.engines.loading import resolve_backend
    from kiln_server.engines.machine import tensorrt_missing

    assert resolve_backend(None, None) == "torch"
    assert resolve_backend(None, engines.parent / "absent") == "torch"
    assert resolve_backend("torch", engines) == "torch"
    add_tensorrt_build(engines, files, H100)
    expected = "onnxruntime" if tensorrt_missing() else "tensorrt"
    if expected == "onnxruntime":
        assert resolve_backend(None, engines) == "onnxruntime"
    with pytest.raises(EngineError, match="unknown backend 'jax'"):
        resolve_backend("jax", engines)
    (engines / "manifest.json").write_text("[]")
    with pytest.raises(EngineError, match="is corrupt"):
        resolve_backend(None, engines)
