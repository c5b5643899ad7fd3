"""TensorRT's logic, without TensorRT: profiles, engine names, buffer planning, the fail-fast
path of `kiln build-engines --format tensorrt` on a machine without it, the build's REFIT
and numerics wiring (fake builder and checker), and the runtime's CUDA-graph ordering and
owned outputs (a fake engine that reads and writes the bound addresses, as TensorRT does)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kiln_server.engines.base import EngineError
from kiln_server.engines.buffers import (
    BufferCache,
    plan_buffers,
    profile_is_static,
    request_from_shapes,
    select_profile,
)
from kiln_server.engines.components import (
    COMPONENT_NAMES,
    ModelDims,
    ShapeRange,
    ShapeRequest,
    sdxl_component_specs,
)
from kiln_server.engines.manifest import MachineInfo

SDXL = sdxl_component_specs(ModelDims())  # real SDXL dims: 768 + 1280 context, 4 channels
DEFAULT = ShapeRequest(1, 1024, 1024)
H100 = MachineInfo("NVIDIA H100 80GB HBM3", "9.0", "10.3.0.26", "12.4")


def test_tensorrt_modules_import_without_tensorrt() -> None:
    import importlib

    for module in (
        "kiln_server.engines.tensorrt_engine",
        "kiln_server.engines.machine",
        "kiln_build.tensorrt_build",
    ):
        importlib.import_module(module)
    if importlib.util.find_spec("tensorrt") is None:
        assert "tensorrt" not in sys.modules


# ------------------------------------------------------------------ profiles


def sdxl_plan(flags: Any = None, limits: Any = None) -> Any:
    """The profile plan of an SDXL model (1024x1024 default, size multiple 32)."""
    from kiln_build.profiles import ModelLimits, ProfileFlags, resolve_plan

    return resolve_plan(flags or ProfileFlags(), DEFAULT, limits or ModelLimits(), 32)


def test_default_profiles_are_static_at_the_default_shape() -> None:
    from kiln_build.profiles import component_profiles

    plan = sdxl_plan()
    unet = component_profiles(SDXL["unet"], plan)
    # Guidance doubles the UNet rows: the static profile is one image at the default size.
    assert unet[0] == ShapeRange(*[ShapeRequest(2, 1024, 1024)] * 3)
    assert SDXL["unet"].profile(unet[0]) == {
        "sample": ((2, 4, 128, 128),) * 3,
        "timestep": ((2,),) * 3,
        "encoder_hidden_states": ((2, 77, 2048),) * 3,
        "text_embeds": ((2, 1280),) * 3,
        "time_ids": ((2, 6),) * 3,
    }
    vae = component_profiles(SDXL["vae_decoder"], plan)
    assert vae[0] == ShapeRange(*[ShapeRequest(1, 1024, 1024)] * 3)
    text = component_profiles(SDXL["text_encoder"], plan)
    assert len(text) == 1
    assert SDXL["text_encoder"].profile(text[0]) == {"input_ids": ((1, 77), (2, 77), (2, 77))}


def test_default_profiles_cover_every_request_the_model_allows() -> None:
    """ModelSpec's defaults: up to 8 images with guidance (16 UNet rows) at the default
    1024x1024 or smaller, down to 256; one VAE image per call."""
    from kiln_build.profiles import component_profiles

    plan = sdxl_plan()
    (_, unet) = component_profiles(SDXL["unet"], plan)
    assert unet == ShapeRange(
        ShapeRequest(1, 256, 256), ShapeRequest(2, 1024, 1024), ShapeRequest(16, 1024, 1024)
    )
    for name in ("vae_decoder", "vae_encoder"):
        (_, vae) = component_profiles(SDXL[name], plan)
        assert vae == ShapeRange(
            ShapeRequest(1, 256, 256), ShapeRequest(1, 1024, 1024), ShapeRequest(1, 1024, 1024)
        )
    for name in ("text_encoder", "text_encoder_2"):
        (text,) = component_profiles(SDXL[name], plan)
        assert (text.min.batch, text.max.batch) == (1, 2)  # a request's prompt + negative


def test_every_request_within_the_model_limits_finds_a_profile() -> None:
    """What validation admits (multiples of 32 here) is what the engines run."""
    from kiln_build.profiles import ModelLimits, ProfileFlags, component_profiles, profile_shapes

    limits = ModelLimits(min_size=512, max_size=1536, max_num_outputs=4)
    plan = sdxl_plan(ProfileFlags(max_size=1536, vae_batch=4), limits=limits)

    def runs(name: str, request: ShapeRequest) -> bool:
        spec = SDXL[name]
        profiles = profile_shapes(spec, component_profiles(spec, plan))
        shapes = spec.shapes(request)
        return select_profile(profiles, {t.name: shapes[t.name] for t in spec.inputs}) is not None

    for images in range(1, limits.max_num_outputs + 1):
        for height, width in [(512, 512), (512, 1536), (1536, 1536), (1024, 768), (544, 1504)]:
            assert runs("unet", ShapeRequest(2 * images, height, width))  # with guidance
            assert runs("unet", ShapeRequest(images, height, width))  # guidance 1
            chunk = min(images, plan.vae_images)
            assert runs("vae_decoder", ShapeRequest(chunk, height, width))
            assert runs("vae_encoder", ShapeRequest(chunk, height, width))
    assert runs("text_encoder", ShapeRequest(1, 0, 0)) and runs(
        "text_encoder_2", ShapeRequest(2, 0, 0)
    )
    assert not runs("unet", ShapeRequest(2 * limits.max_num_outputs + 1, 1024, 1024))
    assert not runs("unet", ShapeRequest(2, 1024, 1568))
    assert not runs("vae_decoder", ShapeRequest(plan.vae_images + 1, 1024, 1024))


def test_size_defaults_round_inwards_to_the_graph_multiple() -> None:
    from kiln_build.profiles import ModelLimits, ProfileFlags, resolve_plan

    limits = ModelLimits(min_size=200, max_size=2000, max_num_outputs=3)
    plan = resolve_plan(ProfileFlags(), DEFAULT, limits, 32)
    assert (plan.min_size, plan.max_size, plan.images, plan.vae_images) == (224, 1024, 3, 1)
    # The tiny model: sides 32 to its 64x64 default, a 16-pixel multiple.
    tiny = resolve_plan(ProfileFlags(), ShapeRequest(1, 64, 64), ModelLimits(32, 512, 8), 16)
    assert (tiny.min_size, tiny.max_size, tiny.size_multiple) == (32, 64, 16)


def test_flags_narrow_the_dynamic_batch_and_resolution_profile() -> None:
    from kiln_build.profiles import ProfileFlags, component_profiles

    flags = ProfileFlags(batch_sizes=(1, 2, 4), min_size=768, max_size=1536, vae_batch=2)
    plan = sdxl_plan(flags)
    static, dynamic = component_profiles(SDXL["unet"], plan)
    assert static == ShapeRange(*[ShapeRequest(2, 1024, 1024)] * 3)
    assert SDXL["unet"].profile(dynamic)["sample"] == (
        (1, 4, 96, 96),
        (2, 4, 128, 128),
        (8, 4, 192, 192),
    )
    (_, vae_dynamic) = component_profiles(SDXL["vae_decoder"], plan)
    assert SDXL["vae_decoder"].profile(vae_dynamic)["latent"] == (
        (1, 4, 96, 96),
        (1, 4, 128, 128),
        (2, 4, 192, 192),
    )
    (text,) = component_profiles(SDXL["text_encoder_2"], plan)
    assert SDXL["text_encoder_2"].profile(text)["input_ids"] == ((1, 77), (2, 77), (2, 77))
    assert flags.as_args() == [
        *("--batch-sizes", "1,2,4", "--min-size", "768", "--max-size", "1536"),
        *("--vae-batch", "2"),
    ]


def test_a_single_shape_plan_builds_only_the_static_profile() -> None:
    from kiln_build.profiles import ProfileFlags, component_profiles

    flags = ProfileFlags(batch_sizes=(1,), min_size=1024, max_size=1024, vae_batch=1)
    plan = sdxl_plan(flags)
    assert component_profiles(SDXL["vae_decoder"], plan) == [
        ShapeRange(*[ShapeRequest(1, 1024, 1024)] * 3)
    ]
    assert len(component_profiles(SDXL["unet"], plan)) == 2  # rows 1 (guidance 1) and 2


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"batch_sizes": (0, 2)}, "--batch-sizes must list positive integers"),
        ({"vae_batch": 0}, "--vae-batch 0 must be a positive integer"),
        ({"min_size": 1000}, "--min-size 1000 must be a positive multiple of 32"),
        ({"max_size": 2056}, "--max-size 2056 must be a positive multiple of 32"),
        ({"min_size": 1536}, "--min-size 1536 exceeds the default size 1024"),
        ({"max_size": 512}, "--max-size 512 is below the default size 1024"),
    ],
)
def test_unusable_flags_are_named(flags: dict[str, Any], message: str) -> None:
    from kiln_build.profiles import ProfileError, ProfileFlags

    with pytest.raises(ProfileError, match=message):
        sdxl_plan(ProfileFlags(**flags))


def test_a_default_size_the_graphs_cannot_run_is_named() -> None:
    from kiln_build.profiles import ModelLimits, ProfileError, ProfileFlags, resolve_plan

    with pytest.raises(ProfileError, match="default size 1016x1024 is not a multiple of 32"):
        resolve_plan(ProfileFlags(), ShapeRequest(1, 1024, 1016), ModelLimits(), 32)


# ------------------------------------------------------------------ engine files


def test_engine_names_never_collide_across_machines() -> None:
    from kiln_build.tensorrt_build import engine_file_name, timing_cache_name

    assert (
        engine_file_name("unet", H100) == "unet.nvidia-h100-80gb-hbm3.sm90.trt10.3.0.26.cu12.plan"
    )
    machines = [
        H100,
        replace(H100, gpu_name="NVIDIA A100-SXM4-80GB", compute_capability="8.0"),
        replace(H100, gpu_name="NVIDIA H100 PCIe"),
        replace(H100, compute_capability="8.9"),
        replace(H100, tensorrt_version="10.4.0"),
        replace(H100, cuda_version="11.8"),
    ]
    names = {engine_file_name(c, m) for c in COMPONENT_NAMES for m in machines}
    assert len(names) == len(COMPONENT_NAMES) * len(machines)
    assert all("/" not in n and " " not in n for n in names)
    # A CUDA minor update runs the same engines, so it reuses the same files.
    assert engine_file_name("unet", replace(H100, cuda_version="12.6")) == engine_file_name(
        "unet", H100
    )
    assert (
        timing_cache_name(H100) == "timing-cache.nvidia-h100-80gb-hbm3.sm90.trt10.3.0.26.cu12.bin"
    )


def test_precision_is_fp16_except_the_vae() -> None:
    from kiln_build.tensorrt_build import precision_for

    assert {c: precision_for(SDXL[c]) for c in COMPONENT_NAMES} == {
        "text_encoder": "fp16",
        "text_encoder_2": "fp16",
        "unet": "fp16",
        "vae_decoder": "fp32",  # SDXL's VAE overflows fp16: black images
        "vae_encoder": "fp32",
        "preview_decoder": "fp16",  # TAESD-style decoders are fp16-safe
    }


# ------------------------------------------------------------------ buffer planning


def test_call_shapes_resolve_to_a_request() -> None:
    unet = SDXL["unet"]
    shapes = unet.shapes(ShapeRequest(3, 768, 1344))
    assert request_from_shapes(unet, shapes) == ShapeRequest(3, 768, 1344)
    text = SDXL["text_encoder"]
    assert request_from_shapes(text, {"input_ids": (2, 77)}) == ShapeRequest(2, 0, 0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"timestep": (2,)}, "has batch=2 on axis 0 but another input has batch=3"),
        ({"encoder_hidden_states": (3, 77, 1024)}, "has size 1024 on axis 2, the declaration"),
        ({"sample": (3, 4, 96)}, "expected 4 dims"),
    ],
)
def test_inconsistent_call_shapes_are_refused(
    change: dict[str, tuple[int, ...]], message: str
) -> None:
    unet = SDXL["unet"]
    shapes = {**unet.shapes(ShapeRequest(3, 768, 1344)), **change}
    with pytest.raises(EngineError, match=message):
        request_from_shapes(unet, shapes)


def test_buffer_plan_follows_the_declaration() -> None:
    plan = plan_buffers(SDXL["unet"], ShapeRequest(2, 1024, 1024))
    assert [(b.name, b.shape, b.is_input) for b in plan.buffers] == [
        ("sample", (2, 4, 128, 128), True),
        ("timestep", (2,), True),
        ("encoder_hidden_states", (2, 77, 2048), True),
        ("text_embeds", (2, 1280), True),
        ("time_ids", (2, 6), True),
        ("noise_pred", (2, 4, 128, 128), False),
    ]
    assert plan.outputs[0].nbytes == 2 * 4 * 128 * 128 * 4
    assert plan.total_bytes == sum(b.nbytes for b in plan.buffers)
    ids = plan_buffers(SDXL["text_encoder"], ShapeRequest(2, 0, 0)).inputs[0]
    assert (ids.dtype, ids.nbytes) == ("int32", 2 * 77 * 4)


def test_profile_selection_prefers_the_exact_static_profile() -> None:
    from kiln_build.profiles import ProfileFlags, component_profiles, profile_shapes

    unet = SDXL["unet"]
    flags = ProfileFlags(batch_sizes=(1, 4), min_size=512, max_size=1536)
    profiles = profile_shapes(unet, component_profiles(unet, sdxl_plan(flags)))
    assert profile_is_static(profiles[0]) and not profile_is_static(profiles[1])

    def pick(batch: int, height: int, width: int) -> int | None:
        shapes = unet.shapes(ShapeRequest(batch, height, width))
        return select_profile(profiles, {t.name: shapes[t.name] for t in unet.inputs})

    assert pick(2, 1024, 1024) == 0  # the CUDA-graph profile
    assert pick(1, 1024, 1024) == 1
    assert pick(8, 768, 1344) == 1
    assert pick(9, 1024, 1024) is None
    assert pick(2, 1024, 2048) is None


def test_buffer_cache_reuses_and_evicts_least_recently_used() -> None:
    allocations: list[ShapeRequest] = []

    def allocate(request: ShapeRequest) -> object:
        allocations.append(request)
        return object()

    cache: BufferCache[object] = BufferCache(capacity=2)
    a, b, c = ShapeRequest(1, 64, 64), ShapeRequest(2, 64, 64), ShapeRequest(3, 64, 64)
    first = cache.get(a, allocate)
    assert cache.get(a, allocate) is first
    cache.get(b, allocate)
    cache.get(a, allocate)  # a is now the most recent
    cache.get(c, allocate)  # evicts b
    assert a in cache and c in cache and b not in cache
    assert allocations == [a, b, c]


# ------------------------------------------------------------------ fail fast


def test_build_engines_tensorrt_fails_fast_without_tensorrt(tmp_path: Path) -> None:
    """No TensorRT or CUDA here: one clear line, exit 1, and no work done (no model built)."""
    from kiln_server.engines.machine import tensorrt_missing

    if not tensorrt_missing():
        pytest.skip("TensorRT and CUDA are available here")
    cache = tmp_path / "cache"
    out = tmp_path / "engines"
    command = [sys.executable, "-m", "kiln_client.cli", "build-engines", "--format", "tensorrt"]
    result = subprocess.run(
        [*command, "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "KILN_CACHE_DIR": str(cache)},
        timeout=120,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: cannot build TensorRT engines: this machine lacks ")
    assert "TensorRT Python package" in result.stderr or "CUDA" in result.stderr
    assert "pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu12" in result.stderr
    assert not out.exists() and not cache.exists()


def test_cli_handler_returns_nonzero_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kiln_client.cli import main
    from kiln_server.engines.machine import tensorrt_missing

    if not tensorrt_missing():
        pytest.skip("TensorRT and CUDA are available here")
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["build-engines", "--format", "tensorrt", "--out", str(tmp_path / "e")]) == 1


# ------------------------------------------------------------------ build wiring


class FakeTensorRT:
    """Just enough of the tensorrt module to record what build_engine asks of it."""

    class Logger:
        WARNING = 2

        def __init__(self, severity: int) -> None:
            self.severity = severity

    class BuilderFlag:
        FP16 = "FP16"
        BF16 = "BF16"
        REFIT = "REFIT"

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    def __init__(self) -> None:
        self.flags: set[str] = set()
        self.profiles: list[dict[str, tuple[tuple[int, ...], ...]]] = []
        self.cache_in: bytes | None = None
        self.parsed: str | None = None
        self.workspace = 0
        fake = self

        class Config:
            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                fake.workspace = size

            def set_flag(self, flag: str) -> None:
                fake.flags.add(flag)

            def add_optimization_profile(self, profile: Any) -> None:
                fake.profiles.append(profile.shapes)

            def create_timing_cache(self, data: bytes) -> bytes:
                fake.cache_in = data
                return data

            def set_timing_cache(self, cache: bytes, ignore_mismatch: bool) -> bool:
                return True

            def get_timing_cache(self) -> Any:
                return type("Cache", (), {"serialize": lambda self: b"timings"})()

        class Profile:
            def __init__(self) -> None:
                self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

            def set_shape(self, name: str, *shapes: tuple[int, ...]) -> None:
                self.shapes[name] = tuple(tuple(s) for s in shapes)

        class Builder:
            def __init__(self, logger: Any) -> None:
                pass

            def create_network(self, flags: int) -> object:
                return object()

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: object, config: Config) -> bytes:
                return b"serialized engine"

        class OnnxParser:
            num_errors = 0

            def __init__(self, network: object, logger: Any) -> None:
                pass

            def parse_from_file(self, path: str) -> bool:
                fake.parsed = path
                return True

        self.Builder = Builder
        self.OnnxParser = OnnxParser


@pytest.mark.parametrize("refittable", [False, True])
@pytest.mark.parametrize(("component", "precision"), [("unet", "fp16"), ("vae_decoder", "fp32")])
def test_build_engine_sets_precision_refit_profiles_and_timing_cache(
    tmp_path: Path, component: str, precision: str, refittable: bool
) -> None:
    from kiln_build.profiles import ProfileFlags, component_profiles
    from kiln_build.tensorrt_build import build_engine

    trt = FakeTensorRT()
    spec = SDXL[component]
    ranges = component_profiles(spec, sdxl_plan(ProfileFlags(batch_sizes=(1, 2))))
    cache = tmp_path / "timing.bin"
    cache.write_bytes(b"earlier timings")
    result = build_engine(
        trt,
        spec,
        tmp_path / "g.onnx",
        tmp_path / "e.plan",
        ranges,
        timing_cache=cache,
        refittable=refittable,
    )
    assert result.precision == precision and result.refittable == refittable
    # REFIT only when asked for: refittable engines can be slower.
    expected = {"FP16"} if precision == "fp16" else set()
    assert trt.flags == (expected | {"REFIT"} if refittable else expected)
    assert trt.profiles == [spec.profile(r) for r in ranges]
    assert trt.parsed == str(tmp_path / "g.onnx")
    assert (tmp_path / "e.plan").read_bytes() == b"serialized engine"
    assert trt.cache_in == b"earlier timings" and cache.read_bytes() == b"timings"


# ------------------------------------------------------------------ TensorRT stage of a build


@dataclass
class TrtBuild:
    """A TensorRT build of the tiny model with a fake TensorRT and a fake numerics check.

    The check returns a record of `records[component]` (per output: relative and absolute
    error; 1e-3 when absent) and logs each component it compared in `compared`.
    """

    engines: Path
    model_path: Path
    trt: FakeTensorRT = field(default_factory=FakeTensorRT)
    compared: list[str] = field(default_factory=list)
    records: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)

    def check(self, spec: Any, onnx: Path, plan: Path, ranges: Any, precision: str) -> Any:
        from kiln_server.engines.engine_numerics import judge_numerics

        assert onnx == self.engines / f"{spec.name}.onnx" and plan.is_file()
        self.compared.append(spec.name)
        errors = self.records.get(spec.name, {"out": (1e-3, 1e-3)})
        return judge_numerics([(ranges[0].opt, errors)], precision)

    def run(self, **options: Any) -> None:
        from test_export_support import MODEL_NAME

        from kiln_build.build import BuildOptions, run_build

        model = self.model_path
        run_build(
            BuildOptions(model, self.engines, "tensorrt", MODEL_NAME, progress=False, **options),
            say=lambda text: None,
        )


@pytest.fixture
def trt_build(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> TrtBuild:
    from test_export_support import copy_engines, tiny_engines

    import kiln_build.numerics
    import kiln_server.engines.machine

    engines = copy_engines(tiny_engines(tmp_path_factory, tiny_model_path), tmp_path / "e")
    build = TrtBuild(engines, tiny_model_path)
    machine = kiln_server.engines.machine
    monkeypatch.setattr(machine, "require_tensorrt", lambda purpose: build.trt)
    monkeypatch.setattr(machine, "probe_machine", lambda *args, **kwargs: H100)
    monkeypatch.setattr(kiln_build.numerics, "check_engine_numerics", build.check)
    return build


@pytest.mark.parametrize("refittable", [False, True])
def test_tensorrt_build_records_refit_profiles_and_numerics(
    trt_build: TrtBuild, refittable: bool
) -> None:
    from kiln_server.engines.manifest import read_manifest

    trt_build.run(refittable=refittable)
    engines = trt_build.engines
    assert ("REFIT" in trt_build.trt.flags) == refittable
    assert trt_build.compared == list(COMPONENT_NAMES)
    manifest = read_manifest(engines)
    build = manifest.tensorrt_build_for(H100)
    assert build is not None and set(build.components) == set(COMPONENT_NAMES)
    for name, component in build.components.items():
        assert component.refittable == refittable
        assert component.numerics is not None and component.numerics.passed, name
        assert component.numerics.max_rel_error == 1e-3
        assert (engines / component.file).read_bytes() == b"serialized engine"
    # The tiny model allows 8 images from 32 pixels a side up to its 64x64 default; its
    # graphs need multiples of 16.
    unet = build.components["unet"].profiles
    assert unet[0] == ShapeRange(*[ShapeRequest(2, 64, 64)] * 3)
    assert unet[1] == ShapeRange(
        ShapeRequest(1, 32, 32), ShapeRequest(2, 64, 64), ShapeRequest(16, 64, 64)
    )
    assert build.components["vae_decoder"].profiles[1].max == ShapeRequest(1, 64, 64)
    assert manifest.build_args == (["--refittable"] if refittable else [])
    assert not list(engines.glob(".staging-*"))


def test_an_engine_that_differs_from_onnxruntime_fails_the_build(trt_build: TrtBuild) -> None:
    from kiln_server.engines.manifest import read_manifest

    trt_build.records["unet"] = {"noise_pred": (0.31, 1.25)}
    with pytest.raises(EngineError) as error:
        trt_build.run()
    message = str(error.value)
    assert message.startswith("the TensorRT engine for 'unet' does not compute what its ONNX")
    assert "max relative error 3.10e-01 (max absolute error 1.25e+00) exceeds the fp16" in message
    assert "output 'noise_pred' at batch 2 at 64x64" in message
    assert message.endswith("or pass --skip-numerics-check to keep engines without this check")
    # Nothing of the failed build stays: no engine files, no TensorRT entry in the manifest.
    assert trt_build.compared == ["text_encoder", "text_encoder_2", "unet"]
    assert not list(trt_build.engines.glob("*.plan"))
    assert not list(trt_build.engines.glob(".staging-*"))
    assert read_manifest(trt_build.engines).tensorrt == []


def test_skip_numerics_check_records_no_comparison(trt_build: TrtBuild) -> None:
    from kiln_server.engines.manifest import read_manifest

    trt_build.run(numerics_check=False)
    assert trt_build.compared == []
    build = read_manifest(trt_build.engines).tensorrt_build_for(H100)
    assert build is not None
    assert all(c.numerics is None for c in build.components.values())


# ------------------------------------------------------------------ numerics verdict


def test_numerics_verdict_uses_the_precision_tolerance() -> None:
    from kiln_server.engines.engine_numerics import judge_numerics, tolerance_for

    assert tolerance_for("fp16") == 2e-2 and tolerance_for("fp32") == 1e-2
    small, large = ShapeRequest(2, 1024, 1024), ShapeRequest(1, 256, 256)
    record = judge_numerics(
        [(small, {"noise_pred": (4e-3, 0.02)}), (large, {"noise_pred": (1.5e-2, 0.01)})], "fp16"
    )
    assert record.passed and record.tolerance == 2e-2
    assert (record.max_rel_error, record.max_abs_error) == (1.5e-2, 0.02)
    assert (record.worst_output, record.worst_shape, record.shapes) == (
        "noise_pred",
        large,
        (small, large),
    )
    assert not judge_numerics([(small, {"images": (1.5e-2, 0.01)})], "fp32").passed
    overflow = judge_numerics([(small, {"a": (1e-3, 1e-3), "b": (float("nan"), 0.0)})], "fp16")
    assert not overflow.passed and overflow.max_rel_error == float("inf")
    assert overflow.worst_output == "b"


def test_numerics_failure_names_component_output_and_error() -> None:
    from kiln_server.engines.engine_numerics import judge_numerics, numerics_failure

    shape = ShapeRequest(1, 1024, 1024)
    record = judge_numerics([(shape, {"images": (float("inf"), float("inf"))})], "fp16")
    message = numerics_failure("vae_decoder", "fp16", record)
    assert "the TensorRT engine for 'vae_decoder'" in message
    assert "non-finite values (inf or NaN) where the reference did not" in message
    assert "output 'images' at batch 1 at 1024x1024" in message
    assert "--skip-numerics-check" in message


def test_numerics_shapes_cover_the_static_and_dynamic_profiles() -> None:
    from kiln_build.numerics import numerics_shapes
    from kiln_build.profiles import component_profiles

    plan = sdxl_plan()
    unet = component_profiles(SDXL["unet"], plan)
    assert numerics_shapes(unet) == [ShapeRequest(2, 1024, 1024), ShapeRequest(1, 256, 256)]
    text = component_profiles(SDXL["text_encoder"], plan)
    assert numerics_shapes(text) == [ShapeRequest(2, 1024, 1024), ShapeRequest(1, 1024, 1024)]


def test_numerics_check_fails_loudly_without_tensorrt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kiln_build.numerics import check_engine_numerics
    from kiln_build.profiles import component_profiles
    from kiln_server.engines import machine

    # What a host without TensorRT reports, so the test runs on GPU hosts too.
    monkeypatch.setattr(machine, "tensorrt_missing", lambda: ["TensorRT 10"])
    ranges = component_profiles(SDXL["unet"], sdxl_plan())
    with pytest.raises(EngineError) as error:
        check_engine_numerics(
            SDXL["unet"], tmp_path / "u.onnx", tmp_path / "u.plan", ranges, "fp16"
        )
    assert str(error.value).startswith(
        "cannot check TensorRT engines against onnxruntime: this machine lacks "
    )


# ------------------------------------------------------------------ runtime, with a fake TensorRT


def _view(pointer: int, dtype: np.dtype, count: int) -> np.ndarray:
    """The `count` elements at host address `pointer`: what TensorRT sees of a binding."""
    buffer = (ctypes.c_char * (count * dtype.itemsize)).from_address(pointer)
    return np.frombuffer(buffer, dtype=dtype)


class FakeRuntimeTRT:
    """The parts of the tensorrt module the runtime reads."""

    class TensorIOMode:
        INPUT = "INPUT"
        OUTPUT = "OUTPUT"

    class ExecutionContextAllocationStrategy:
        USER_MANAGED = "USER_MANAGED"

    @staticmethod
    def nptype(dtype: str) -> type:
        return np.dtype(dtype).type


class FakeContext:
    """An execution context that logs every call and computes noise_pred = 2 * sample + 1
    through the bound addresses (reading and writing raw memory, as TensorRT does)."""

    def __init__(self, engine: FakeCudaEngine) -> None:
        self.engine = engine
        self.log = engine.log
        self.active_optimization_profile = 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.capturing = False

    def set_optimization_profile_async(self, profile: int, stream: int) -> bool:
        self.active_optimization_profile = profile
        self.log.append(f"profile {profile}")
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, pointer: int) -> None:
        self.addresses[name] = pointer
        if name == "sample":
            self.log.append(f"bind {self.shapes['sample']}")

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        spec = self.engine.spec
        return spec.shape(name, request_from_shapes(spec, self.shapes))

    def set_device_memory(self, pointer: int, size: int) -> None:
        pass

    def compute(self, addresses: dict[str, int], shapes: dict[str, tuple[int, ...]]) -> None:
        count = int(np.prod(shapes["sample"]))
        sample = _view(addresses["sample"], np.dtype("float32"), count)
        _view(addresses["noise_pred"], np.dtype("float32"), count)[:] = 2 * sample + 1

    def execute_async_v3(self, stream: int) -> bool:
        self.log.append("capture execute" if self.capturing else "execute")
        if not self.capturing:
            self.compute(self.addresses, self.shapes)
        return True


class FakeCudaEngine:
    def __init__(self, spec: Any, ranges: list[ShapeRange]) -> None:
        self.spec = spec
        self.ranges = ranges
        self.log: list[str] = []
        self.num_io_tensors = len(spec.tensors)
        self.num_optimization_profiles = len(ranges)
        self.device_memory_size_v2 = 1024
        self.context: FakeContext | None = None

    def get_tensor_name(self, index: int) -> str:
        return str(self.spec.tensors[index].name)

    def get_tensor_mode(self, name: str) -> str:
        is_input = any(t.name == name for t in self.spec.inputs)
        return FakeRuntimeTRT.TensorIOMode.INPUT if is_input else "OUTPUT"

    def get_tensor_dtype(self, name: str) -> str:
        return str(self.spec.tensor(name).dtype)

    def get_tensor_profile_shape(self, name: str, profile: int) -> tuple[tuple[int, ...], ...]:
        return self.spec.profile(self.ranges[profile])[name]

    def create_execution_context(self, strategy: str) -> FakeContext:
        assert strategy == "USER_MANAGED"
        self.context = FakeContext(self)
        return self.context


class FakeStream:
    cuda_stream = 7

    def wait_stream(self, other: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


class FakeGraph:
    """A captured run: replays with the addresses and shapes bound at capture."""

    def __init__(self, context: FakeContext) -> None:
        self.context = context
        self.addresses = dict(context.addresses)
        self.shapes = dict(context.shapes)

    def replay(self) -> None:
        self.context.log.append("replay")
        self.context.compute(self.addresses, self.shapes)


class FakeRuntime:
    """TensorRTRuntime's interface on the CPU: streams are no-ops, capture logs."""

    def __init__(self, engine: FakeCudaEngine) -> None:
        self.trt = FakeRuntimeTRT
        self.device = torch.device("cpu")
        self.stream = FakeStream()
        self.engine = engine

    def current_stream(self) -> FakeStream:
        return FakeStream()

    def on_stream(self) -> Any:
        return contextlib.nullcontext()

    def capture(self, enqueue: Any) -> FakeGraph:
        context = self.engine.context
        assert context is not None
        context.log.append("capture")
        context.capturing = True
        try:
            enqueue()
        finally:
            context.capturing = False
        return FakeGraph(context)


TINY_DIMS = ModelDims(text_hidden_size=8, text_hidden_size_2=8, pooled_dim=8, num_time_ids=6)
STATIC = ShapeRequest(2, 64, 64)
OTHER = ShapeRequest(1, 64, 96)


def fake_engine(cuda_graphs: bool = True) -> tuple[Any, list[str]]:
    from kiln_server.engines.tensorrt_engine import TensorRTEngine

    spec = sdxl_component_specs(TINY_DIMS)["unet"]
    ranges = [
        ShapeRange(STATIC, STATIC, STATIC),
        ShapeRange(ShapeRequest(1, 64, 64), STATIC, ShapeRequest(4, 128, 128)),
    ]
    trt_engine = FakeCudaEngine(spec, ranges)
    engine = TensorRTEngine(spec, trt_engine, FakeRuntime(trt_engine), cuda_graphs)  # type: ignore[arg-type]
    engine.set_device_memory(0, 1024)
    return engine, trt_engine.log


def unet_inputs(request: ShapeRequest, seed: int) -> dict[str, torch.Tensor]:
    from kiln_server.engines.sample_inputs import sample_inputs

    return sample_inputs(sdxl_component_specs(TINY_DIMS)["unet"], request, seed=seed)


def test_fake_engine_exposes_profiles_and_max_batch() -> None:
    engine, _ = fake_engine()
    assert engine.max_batch == 4
    assert engine.profiles[0]["sample"] == ((2, 4, 8, 8),) * 3
    assert engine.profiles[1]["sample"] == ((1, 4, 8, 8), (2, 4, 8, 8), (4, 4, 16, 16))


def test_a_graph_is_captured_only_after_a_plain_run_of_the_current_binding() -> None:
    engine, log = fake_engine()

    def call(request: ShapeRequest) -> list[str]:
        start = len(log)
        engine.infer(unet_inputs(request, seed=len(log)))
        return log[start:]

    bind_static = ["bind (2, 4, 8, 8)"]
    assert call(STATIC) == [*bind_static, "execute"]
    assert call(STATIC) == ["capture", "capture execute", "replay"]
    assert call(STATIC) == ["replay"]
    assert call(OTHER) == ["profile 1", "bind (1, 4, 8, 12)", "execute"]
    # Back on the static shape after another one ran: rebinding drops the graph, and a
    # plain run must follow the binding before the next capture (not a capture at once).
    assert call(STATIC) == ["profile 0", *bind_static, "execute"]
    assert call(STATIC) == ["capture", "capture execute", "replay"]
    # Alternating shapes never capture: each binding is followed by one plain run only.
    for _ in range(2):
        assert call(OTHER)[-1] == "execute"
        assert call(STATIC)[-1] == "execute"
    # A dynamic profile is never captured.
    call(OTHER)
    assert call(OTHER) == ["execute"]


def test_every_capture_follows_a_plain_run_since_its_binding() -> None:
    engine, log = fake_engine()
    sequence = [STATIC, OTHER, STATIC, STATIC, OTHER, OTHER, STATIC, STATIC, STATIC, OTHER]
    for seed, request in enumerate(sequence):
        engine.infer(unet_inputs(request, seed))
    plain_since_bind = 0
    for event in log:
        if event.startswith("bind"):
            plain_since_bind = 0
        elif event == "execute":
            plain_since_bind += 1
        elif event == "capture":
            assert plain_since_bind >= 1, log


def test_without_cuda_graphs_every_run_is_plain() -> None:
    engine, log = fake_engine(cuda_graphs=False)
    for seed in range(3):
        engine.infer(unet_inputs(STATIC, seed))
    assert log == ["bind (2, 4, 8, 8)", "execute", "execute", "execute"]


@pytest.mark.parametrize("request_shape", [STATIC, OTHER], ids=["static", "dynamic"])
def test_outputs_are_owned_by_the_caller(request_shape: ShapeRequest) -> None:
    """Outputs survive later calls (replays included): the engine never hands out a buffer
    it writes again."""
    engine, log = fake_engine()
    first_inputs = unet_inputs(request_shape, seed=1)
    first = engine.infer(first_inputs)["noise_pred"]
    expected = 2 * first_inputs["sample"] + 1
    assert torch.equal(first, expected)
    later = [engine.infer(unet_inputs(request_shape, seed=s))["noise_pred"] for s in (2, 3, 4)]
    assert torch.equal(first, expected)
    assert not torch.equal(later[0], later[1])
    pointers = {t.untyped_storage().data_ptr() for t in [first, *later]}
    assert len(pointers) == 4
    bound = engine._bound.outputs["noise_pred"].untyped_storage().data_ptr()
    assert bound not in pointers
    if request_shape == STATIC:
        assert "replay" in log


# ------------------------------------------------------------------ LoRA inputs, fake TensorRT


class FakeLoraContext(FakeContext):
    """noise_pred = 2 * sample + 1 + scale * down[slot][0, 0] per row, the adapter stack
    read through its bound address (as TensorRT reads a bound input)."""

    def compute(self, addresses: dict[str, int], shapes: dict[str, tuple[int, ...]]) -> None:
        super().compute(addresses, shapes)
        rows = shapes["sample"][0]
        per_row = int(np.prod(shapes["sample"][1:]))
        slots = _view(addresses["lora_slots"], np.dtype("int64"), rows)
        scales = _view(addresses["lora_scales"], np.dtype("float32"), rows)
        stack_shape = shapes["lora_down.layer"]
        down = _view(addresses["lora_down.layer"], np.dtype("float32"), int(np.prod(stack_shape)))
        down = down.reshape(stack_shape)
        out = _view(addresses["noise_pred"], np.dtype("float32"), rows * per_row)
        for row in range(rows):
            out[row * per_row : (row + 1) * per_row] += scales[row] * down[slots[row], 0, 0]


class FakeLoraCudaEngine(FakeCudaEngine):
    def create_execution_context(self, strategy: str) -> FakeContext:
        self.context = FakeLoraContext(self)
        return self.context


def fake_lora_engine() -> tuple[Any, list[str], Any]:
    """A TensorRT UNet engine with LoRA inputs for one 4 -> 4 Linear named `layer`, fed
    from a 2-slot, rank-1 adapter stack on the CPU."""
    from kiln_server.engines.components import LoraInputs, LoraLayerSpec
    from kiln_server.engines.tensorrt_engine import TensorRTEngine
    from kiln_server.lora.graph_feed import CompiledLora, GraphLoraFeed
    from kiln_server.lora.layers import install_row_lora
    from kiln_server.lora.stack import AdapterStack

    lora = LoraInputs(2, 1, 1, (LoraLayerSpec("layer", (4,), 4),))
    spec = sdxl_component_specs(TINY_DIMS, lora=lora)["unet"]
    trt_engine = FakeLoraCudaEngine(spec, [ShapeRange(STATIC, STATIC, STATIC)])
    engine = TensorRTEngine(spec, trt_engine, FakeRuntime(trt_engine), True)
    engine.set_device_memory(0, 1024)
    model = torch.nn.Module()
    model.layer = torch.nn.Linear(4, 4)
    layers = install_row_lora(model)
    feed = GraphLoraFeed(lora, layers, torch.device("cpu"))
    engine.lora = CompiledLora("tensorrt", "kiln build-engines", feed)
    return engine, trt_engine.log, AdapterStack(layers, capacity=2, max_rank=1)


def _adapter(name: str, value: float) -> Any:
    from kiln_server.lora.weights import LoraModule, LoraWeights

    module = LoraModule(torch.full((1, 4), value), torch.ones(4, 1), 1.0)
    return LoraWeights(name, "diffusers", {"layer": module})


def test_lora_stacks_are_bound_by_address_and_rebound_only_when_it_changes() -> None:
    from kiln_server.pipeline.params import LoraUse

    engine, log, stack = fake_lora_engine()
    base_inputs = {k: v for k, v in unet_inputs(STATIC, seed=1).items()}
    expected = 2 * base_inputs["sample"] + 1

    def call() -> tuple[torch.Tensor, list[str]]:
        start = len(log)
        return engine.infer(base_inputs)["noise_pred"], log[start:]

    # No adapter has targeted the layer: its stacks are the shared zero buffer.
    out, events = call()
    assert torch.equal(out, expected) and events == ["bind (2, 4, 8, 8)", "execute"]
    assert "lora_down.layer" not in engine._bound.inputs  # bound, never copied per call
    assert call()[1] == ["capture", "capture execute", "replay"]

    # The first adapter allocates the layer's stack: a new address, so a rebinding.
    stack.load(_adapter("ink", 0.5))
    stack.assign([[LoraUse("ink", 2.0)], []])
    out, events = call()
    assert events == ["bind (2, 4, 8, 8)", "execute"]
    assert torch.equal(out[0], expected[0] + 1.0) and torch.equal(out[1], expected[1])
    assert call()[1] == ["capture", "capture execute", "replay"]

    # A slot rewritten in place (evicted, another adapter loaded there) is read by the
    # replayed graph without any rebinding.
    stack.clear()
    stack.evict("ink")
    stack.load(_adapter("wash", 0.25))
    stack.assign([[], [LoraUse("wash", 4.0)]])
    out, events = call()
    assert events == ["replay"]
    assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1] + 1.0)


def test_a_lora_unet_profile_declares_every_lora_input() -> None:
    from kiln_server.engines.components import LoraInputs, LoraLayerSpec

    lora = LoraInputs(3, 16, 2, (LoraLayerSpec("conv", (4, 3, 3), 8),))
    spec = sdxl_component_specs(ModelDims(), lora=lora)["unet"]
    low = ShapeRequest(1, 512, 512)
    high = ShapeRequest(16, 1024, 1024)
    profile = spec.profile(ShapeRange(low, DEFAULT, high))
    assert profile["lora_slots"] == ((1, 2), (1, 2), (16, 2))
    assert profile["lora_scales"] == ((1, 2), (1, 2), (16, 2))
    assert profile["lora_down.conv"] == ((4, 16, 4, 3, 3),) * 3
    assert profile["lora_up.conv"] == ((4, 8, 16),) * 3


def test_build_engine_gives_every_lora_input_a_profile(tmp_path: Path) -> None:
    """The LoRA UNet's build declares its per-row inputs over the profile's rows and its
    stacks at their fixed shapes (`IOptimizationProfile.set_shape` for each)."""
    from kiln_build.profiles import ProfileFlags, component_profiles
    from kiln_build.tensorrt_build import build_engine
    from kiln_server.engines.components import LoraInputs, LoraLayerSpec

    lora = LoraInputs(8, 64, 4, (LoraLayerSpec("mid_block.attentions.0.proj_in", (1280,), 1280),))
    spec = sdxl_component_specs(ModelDims(), lora=lora)["unet"]
    trt = FakeTensorRT()
    ranges = component_profiles(spec, sdxl_plan(ProfileFlags(batch_sizes=(1, 4))))
    build_engine(trt, spec, tmp_path / "g.onnx", tmp_path / "e.plan", ranges)
    static, dynamic = trt.profiles
    assert static["lora_slots"] == ((2, 4), (2, 4), (2, 4))
    assert dynamic["lora_scales"] == ((1, 4), (2, 4), (8, 4))
    stack = "lora_down.mid_block.attentions.0.proj_in"
    assert dynamic[stack] == ((9, 64, 1280),) * 3
    assert set(dynamic) == {t.name for t in spec.inputs}
