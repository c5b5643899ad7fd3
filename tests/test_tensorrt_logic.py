"""TensorRT's pure logic, without TensorRT: profiles, engine names, buffer planning, and the
fail-fast path of `kiln build-engines --format tensorrt` on a machine without it."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

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


def test_default_profiles_are_static_at_the_default_shape() -> None:
    from kiln_build.profiles import ProfileFlags, component_profiles

    unet = component_profiles(SDXL["unet"], DEFAULT, ProfileFlags())
    # Guidance doubles the UNet rows; rows 1 (no guidance) to 2 at the default size follow.
    assert unet[0] == ShapeRange(*[ShapeRequest(2, 1024, 1024)] * 3)
    assert unet[1] == ShapeRange(
        ShapeRequest(1, 1024, 1024), ShapeRequest(2, 1024, 1024), ShapeRequest(2, 1024, 1024)
    )
    assert SDXL["unet"].profile(unet[0]) == {
        "sample": ((2, 4, 128, 128),) * 3,
        "timestep": ((2,),) * 3,
        "encoder_hidden_states": ((2, 77, 2048),) * 3,
        "text_embeds": ((2, 1280),) * 3,
        "time_ids": ((2, 6),) * 3,
    }
    vae = component_profiles(SDXL["vae_decoder"], DEFAULT, ProfileFlags())
    assert vae == [ShapeRange(*[ShapeRequest(1, 1024, 1024)] * 3)]
    text = component_profiles(SDXL["text_encoder"], DEFAULT, ProfileFlags())
    assert len(text) == 1
    assert SDXL["text_encoder"].profile(text[0]) == {"input_ids": ((1, 77), (2, 77), (2, 77))}


def test_flags_add_a_dynamic_batch_and_resolution_profile() -> None:
    from kiln_build.profiles import ProfileFlags, component_profiles

    flags = ProfileFlags(batch_sizes=(1, 2, 4), min_size=768, max_size=1536)
    static, dynamic = component_profiles(SDXL["unet"], DEFAULT, flags)
    assert static == ShapeRange(*[ShapeRequest(2, 1024, 1024)] * 3)
    assert SDXL["unet"].profile(dynamic)["sample"] == (
        (1, 4, 96, 96),
        (2, 4, 128, 128),
        (8, 4, 192, 192),
    )
    (_, vae_dynamic) = component_profiles(SDXL["vae_decoder"], DEFAULT, flags)
    assert SDXL["vae_decoder"].profile(vae_dynamic)["latent"] == (
        (1, 4, 96, 96),
        (1, 4, 128, 128),
        (4, 4, 192, 192),
    )
    (text,) = component_profiles(SDXL["text_encoder_2"], DEFAULT, flags)
    assert SDXL["text_encoder_2"].profile(text)["input_ids"] == ((1, 77), (2, 77), (8, 77))
    assert flags.as_args() == ["--batch-sizes", "1,2,4", "--min-size", "768", "--max-size", "1536"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"batch_sizes": (0, 2)}, "--batch-sizes must list positive integers"),
        ({"min_size": 1000}, "--min-size 1000 must be a positive multiple of 32"),
        ({"min_size": 1536}, "--min-size 1536 exceeds the default size 1024"),
        ({"max_size": 512}, "--max-size 512 is below the default size 1024"),
    ],
)
def test_unusable_flags_are_named(flags: dict[str, Any], message: str) -> None:
    from kiln_build.profiles import ProfileError, ProfileFlags, check_flags

    with pytest.raises(ProfileError, match=message):
        check_flags(ProfileFlags(**flags), DEFAULT, 32)


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

    assert {c: precision_for(c) for c in COMPONENT_NAMES} == {
        "text_encoder": "fp16",
        "text_encoder_2": "fp16",
        "unet": "fp16",
        "vae_decoder": "fp32",  # SDXL's VAE overflows fp16: black images
        "vae_encoder": "fp32",
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
    profiles = profile_shapes(unet, component_profiles(unet, DEFAULT, flags))
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


@pytest.mark.parametrize(("component", "precision"), [("unet", "fp16"), ("vae_decoder", "fp32")])
def test_build_engine_sets_precision_refit_profiles_and_timing_cache(
    tmp_path: Path, component: str, precision: str
) -> None:
    from kiln_build.profiles import ProfileFlags, component_profiles
    from kiln_build.tensorrt_build import build_engine

    trt = FakeTensorRT()
    spec = SDXL[component]
    ranges = component_profiles(spec, DEFAULT, ProfileFlags(batch_sizes=(1, 2)))
    cache = tmp_path / "timing.bin"
    cache.write_bytes(b"earlier timings")
    result = build_engine(
        trt, spec, tmp_path / "g.onnx", tmp_path / "e.plan", ranges, timing_cache=cache
    )
    assert result.precision == precision
    assert trt.flags == ({"REFIT", "FP16"} if precision == "fp16" else {"REFIT"})
    assert trt.profiles == [spec.profile(r) for r in ranges]
    assert trt.parsed == str(tmp_path / "g.onnx")
    assert (tmp_path / "e.plan").read_bytes() == b"serialized engine"
    assert trt.cache_in == b"earlier timings" and cache.read_bytes() == b"timings"
