"""FLUX on compiled engines: `kiln build-engines` exports, cleans and validates every FLUX
component; the server serves the graphs on onnxruntime, matching torch; a TensorRT build
(fake TensorRT here: none can be installed) declares bf16 and the transformer's token
profiles; and the limits a TensorRT engine set declares come from those profiles.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from test_flux_pipeline import _photo
from test_flux_serving import _images
from test_tensorrt_logic import H100, FakeContext, FakeCudaEngine, FakeRuntime, FakeTensorRT, _view

from kiln_build.profiles import (
    ModelLimits,
    ProfileFlags,
    component_profiles,
    profile_shapes,
    resolve_plan,
)
from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.proto.kiln.v1 import generation_service_pb2_grpc as pb_grpc
from kiln_server.engines.base import EngineError
from kiln_server.engines.buffers import request_from_shapes
from kiln_server.engines.components import ShapeRequest
from kiln_server.engines.flux_components import FluxDims, flux_component_specs
from kiln_server.engines.flux_engines import FluxEngineSet, flux_declared_limits
from kiln_server.models.registry import ModelRegistry
from kiln_server.pipeline.params import GenerationParams, ImageConditioning
from kiln_server.runtime import load_flux_pipeline

CONFIG = """
[[models]]
name = "flux-dev"
builtin = "kiln-tiny-flux-dev"
default_num_inference_steps = 3

[[models]]
name = "flux-schnell"
builtin = "kiln-tiny-flux-schnell"
"""
# FLUX.1's real dims (dev: guidance embedding).
DEV = FluxDims(guidance_embeds=True)
SCHNELL = FluxDims(guidance_embeds=False)


def _build(config: Path, root: Path, model: str, cache: Path, *extra: str) -> int:
    """`kiln build-engines` in process, its built-in models in `cache` (as the servers')."""
    from kiln_client.cli import main

    command = ["build-engines", "--config", str(config), "--model", model, "--out", str(root)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KILN_CACHE_DIR", str(cache))
        return main([*command, "--quiet", *extra])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, kiln_cache_dir: Path) -> tuple[Path, Path]:
    """(config file, engines root) with ONNX engines of flux-dev built by the CLI."""
    folder = tmp_path_factory.mktemp("flux-engines")
    config = folder / "kiln.toml"
    config.write_text(CONFIG)
    root = folder / "engines"
    assert _build(config, root, "flux-dev", kiln_cache_dir) == 0
    return config, root


def _registry(config: Path, cache: Path) -> ModelRegistry:
    from kiln_server.settings import read_config_file

    return ModelRegistry.from_config(read_config_file(config), cache)


def test_build_engines_exports_and_validates_every_flux_component(
    built: tuple[Path, Path],
) -> None:
    _, root = built
    manifest = json.loads((root / "flux-dev" / "manifest.json").read_text())
    assert set(manifest["onnx"]) == set(flux_component_specs(DEV))
    for name, entry in manifest["onnx"].items():
        assert (root / "flux-dev" / entry["file"]).is_file()
        # Validated against torch at new batch sizes and a non-square size.
        assert len(entry["validated"]) >= 2, name
        assert max(v["max_rel_error"] for v in entry["validated"]) < 1e-3, name
    names = [i["name"] for i in manifest["onnx"]["transformer"]["inputs"]]
    assert "guidance" in names and "img_ids" in names


def test_onnxruntime_serves_flux_and_matches_torch(
    built: tuple[Path, Path], kiln_cache_dir: Path
) -> None:
    config, root = built
    spec = _registry(config, kiln_cache_dir).models["flux-dev"]
    compiled = load_flux_pipeline(spec, None, root, config)
    # Chosen by itself on the CPU, from the engines directory.
    assert compiled.engines.backend == "onnxruntime"
    assert "ONNX graphs" in compiled.engines.reason
    assert compiled.limits.size_multiple == 16 and compiled.limits.distilled_guidance
    assert compiled.limits.image_inputs
    eager = load_flux_pipeline(spec, "torch", None)
    # Two images of a size the graphs were not traced at, and img2img.
    params = GenerationParams(
        prompt="a red circle",
        width=96,
        height=64,
        num_outputs=2,
        num_inference_steps=3,
        guidance_scale=3.5,
        scheduler=spec.default_scheduler,
        seed=5,
        model=spec.name,
    )
    photo = ImageConditioning(_photo(96, 64), 0.6)
    for request in (params, replace(params, image=photo)):
        got, want = compiled.generate(request), eager.generate(request)
        for ours, theirs in zip(got, want, strict=True):
            diff = np.abs(np.asarray(ours, np.int16) - np.asarray(theirs, np.int16))
            assert diff.max() <= 2


def test_engines_of_another_model_are_refused_naming_the_rebuild(
    built: tuple[Path, Path], kiln_cache_dir: Path, tmp_path: Path
) -> None:
    config, root = built
    spec = _registry(config, kiln_cache_dir).models["flux-schnell"]
    # flux-dev's engines where flux-schnell's belong.
    import shutil

    shutil.copytree(root / "flux-dev", tmp_path / "flux-schnell")
    with pytest.raises(EngineError) as error:
        load_flux_pipeline(spec, "onnxruntime", tmp_path, config)
    message = str(error.value)
    assert "kiln build-engines" in message and "--model flux-schnell" in message


def test_onnxruntime_without_engines_names_the_flag(
    built: tuple[Path, Path], kiln_cache_dir: Path
) -> None:
    config, _ = built
    spec = _registry(config, kiln_cache_dir).models["flux-dev"]
    with pytest.raises(EngineError, match="pass --engines DIR"):
        load_flux_pipeline(spec, "onnxruntime", None, config)


def test_lora_inputs_for_a_flux_model_are_refused(
    built: tuple[Path, Path],
    kiln_cache_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config, _ = built
    assert _build(config, tmp_path, "flux-schnell", kiln_cache_dir, "--lora-slots", "2") == 1
    error = capsys.readouterr().err
    assert "is a FLUX model, whose engines take no --lora-slots" in error
    assert not (tmp_path / "flux-schnell" / "manifest.json").exists()


@pytest.fixture(scope="module")
def onnx_server(
    built: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory, kiln_cache_dir: Path
) -> Iterator[Any]:
    from conftest import start_server

    config, root = built
    server = start_server(
        tmp_path_factory.mktemp("flux-onnx-server"),
        kiln_cache_dir,
        "--engines",
        str(root),
        config=config.read_text(),
    )
    yield server
    server.terminate()


def test_one_server_serves_flux_on_onnxruntime_beside_torch(onnx_server: Any) -> None:
    channel = grpc.insecure_channel(onnx_server.address)
    stub = pb_grpc.GenerationServiceStub(channel)
    try:
        models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models}
        # flux-dev has engines in --engines; flux-schnell has none and runs on torch.
        assert (models["flux-dev"].backend, models["flux-schnell"].backend) == (
            "onnxruntime",
            "torch",
        )
        images = _images(stub, model="flux-dev", prompt="a blue square", seed=3, num_outputs=2)
        assert len(images) == 2 and images[0].shape == (64, 64, 3)
        # A size that is not a multiple of 16 is refused before any work.
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Generate(pb.GenerateRequest(model="flux-dev", prompt="x", width=72)))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        channel.close()


# ------------------------------------------------------------------ TensorRT, without TensorRT


def _plan(dims: FluxDims, limits: ModelLimits | None = None, **flags: Any) -> Any:
    limits = limits or ModelLimits(256, 2048, 4)
    return resolve_plan(ProfileFlags(**flags), ShapeRequest(1, 1024, 1024), limits, 16)


@pytest.mark.parametrize(
    ("dims", "guidance", "negative", "rows"),
    [
        (SCHNELL, 1.0, False, 1),
        (SCHNELL, 3.0, True, 2),
        (SCHNELL, 3.0, False, 1),
        (DEV, 3.5, False, 1),
    ],
)
def test_the_static_transformer_profile_fits_the_default_request(
    dims: FluxDims, guidance: float, negative: bool, rows: int
) -> None:
    """CUDA graphs replay only the static profile: it holds the rows of the model's default
    request (true CFG with a default negative prompt: 2)."""
    spec = flux_component_specs(dims)["transformer"]
    plan = _plan(dims, ModelLimits(256, 2048, 4, guidance, negative))
    static = component_profiles(spec, plan)[0]
    assert static.opt == ShapeRequest(rows, 1024, 1024)


def test_flux_engines_build_in_bf16() -> None:
    from kiln_build.tensorrt_build import precision_for

    assert {name: precision_for(spec) for name, spec in flux_component_specs(DEV).items()} == {
        name: "bf16" for name in flux_component_specs(DEV)
    }


def test_a_bf16_build_sets_the_bf16_flag(tmp_path: Path) -> None:
    from kiln_build.tensorrt_build import build_engine

    trt = FakeTensorRT()
    spec = flux_component_specs(DEV)["transformer"]
    ranges = component_profiles(spec, _plan(DEV))
    result = build_engine(trt, spec, tmp_path / "t.onnx", tmp_path / "t.plan", ranges)
    assert result.precision == "bf16" and trt.flags == {"BF16"}
    assert trt.profiles == [spec.profile(r) for r in ranges]


@pytest.mark.parametrize(("dims", "rows_per_image"), [(DEV, 1), (SCHNELL, 2)])
def test_transformer_profiles_cover_tokens_and_rows(dims: FluxDims, rows_per_image: int) -> None:
    spec = flux_component_specs(dims)["transformer"]
    static, dynamic = profile_shapes(spec, component_profiles(spec, _plan(dims)))
    # The static profile: one image at 1024x1024 = 64 x 64 tokens, at the default request's
    # rows (here guidance 7.5 without a negative prompt: one row either way).
    assert static["hidden_states"] == ((1, 4096, 64),) * 3
    assert static["img_ids"] == ((4096, 3),) * 3
    assert static["txt_ids"] == ((512, 3),) * 3
    # Dynamic: 1 row at 256x256 (256 tokens) to 4 images at 1024x1024; a distilled model
    # takes one row per image, others two (true CFG).
    low, _, high = dynamic["hidden_states"]
    assert (low, high) == ((1, 256, 64), (4 * rows_per_image, 4096, 64))
    if dims.guidance_embeds:
        assert dynamic["guidance"][2] == (4,)


def test_a_transformer_call_resolves_to_a_request_of_its_token_count() -> None:
    spec = flux_component_specs(DEV)["transformer"]
    request = request_from_shapes(spec, spec.shapes(ShapeRequest(3, 768, 1344)))
    assert request.batch == 3
    # Only the token count is known: every shape of the call is the same.
    assert spec.shapes(request) == spec.shapes(ShapeRequest(3, 768, 1344))


def _fake_engine(spec: Any, ranges: Any) -> Any:
    profiles = profile_shapes(spec, ranges)
    first = spec.inputs[0].name
    return SimpleNamespace(
        spec=spec, profiles=profiles, max_batch=max(p[first][2][0] for p in profiles)
    )


def _engine_set(plan: Any, transformer_plan: Any = None) -> FluxEngineSet:
    specs = flux_component_specs(DEV)
    engines = {
        name: _fake_engine(spec, component_profiles(spec, plan)) for name, spec in specs.items()
    }
    if transformer_plan is not None:
        spec = specs["transformer"]
        engines["transformer"] = _fake_engine(spec, component_profiles(spec, transformer_plan))
    return FluxEngineSet(backend="tensorrt", **engines)


def test_tensorrt_limits_come_from_the_profiles() -> None:
    limits = flux_declared_limits(_engine_set(_plan(DEV, batch_sizes=(2,), min_size=512)), DEV)
    assert (limits.min_width, limits.max_width) == (512, 1024)
    assert (limits.min_height, limits.max_height) == (512, 1024)
    assert limits.unet_rows == 2 and limits.vae_decoder_images == 1
    assert limits.text_encoder_prompts == 2 and limits.distilled_guidance


def test_a_transformer_built_for_fewer_tokens_is_refused() -> None:
    small = _plan(DEV, max_size=1024, min_size=256)
    engines = _engine_set(_plan(DEV, max_size=2048), transformer_plan=small)
    with pytest.raises(EngineError, match="runs 256-4096 image tokens but the VAE"):
        flux_declared_limits(engines, DEV)


def test_flux_tensorrt_build_records_bf16_engines(
    tmp_path: Path, kiln_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole build with a fake TensorRT and numerics check: ONNX stage, then an engine
    per component in bf16, each with the transformer's token profiles in the manifest."""
    import kiln_build.numerics
    import kiln_server.engines.machine
    from kiln_build.build import BuildOptions, run_build
    from kiln_server.engines.engine_numerics import judge_numerics
    from kiln_server.engines.manifest import read_manifest
    from kiln_server.models.tiny_flux import ensure_tiny_flux

    trt = FakeTensorRT()
    compared: list[tuple[str, str]] = []

    def check(spec: Any, onnx: Path, plan: Path, ranges: Any, precision: str) -> Any:
        compared.append((spec.name, precision))
        return judge_numerics([(ranges[0].opt, {"out": (1e-2, 1e-2)})], precision)

    machine = kiln_server.engines.machine
    monkeypatch.setattr(machine, "require_tensorrt", lambda purpose: trt)
    monkeypatch.setattr(machine, "probe_machine", lambda *args, **kwargs: H100)
    monkeypatch.setattr(kiln_build.numerics, "check_engine_numerics", check)
    folder = ensure_tiny_flux(kiln_cache_dir / "models", guidance=False)
    out = tmp_path / "flux"
    run_build(BuildOptions(folder, out, "tensorrt", "flux", progress=False), say=lambda _: None)
    names = list(flux_component_specs(SCHNELL))
    assert compared == [(name, "bf16") for name in names]
    build = read_manifest(out).tensorrt_build_for(H100)
    assert build is not None and set(build.components) == set(names)
    assert {c.precision for c in build.components.values()} == {"bf16"}
    # The tiny schnell-style model: 64x64 default, sizes from its 32-pixel minimum; no
    # guidance embedding, so up to 2 rows per image (8 images, the default
    # max_num_outputs), and its default request (guidance 1) takes one.
    transformer = build.components["transformer"].profiles
    assert transformer[0].opt == ShapeRequest(1, 64, 64)
    assert transformer[1].min == ShapeRequest(1, 32, 32)
    assert transformer[1].max == ShapeRequest(16, 64, 64)


class FluxFakeContext(FakeContext):
    """The fake TensorRT context, computing noise_pred = 2 * hidden_states + 1."""

    def set_tensor_address(self, name: str, pointer: int) -> None:
        self.addresses[name] = pointer

    def compute(self, addresses: dict[str, int], shapes: dict[str, tuple[int, ...]]) -> None:
        count = int(np.prod(shapes["hidden_states"]))
        hidden = _view(addresses["hidden_states"], np.dtype("float32"), count)
        _view(addresses["noise_pred"], np.dtype("float32"), count)[:] = 2 * hidden + 1


class FluxFakeCudaEngine(FakeCudaEngine):
    def create_execution_context(self, strategy: str) -> FakeContext:
        self.context = FluxFakeContext(self)
        return self.context


def test_a_tensorrt_transformer_runs_any_size_of_its_token_range() -> None:
    """The server's TensorRT runtime drives a FLUX transformer engine (a fake one): calls
    resolve to token counts, one buffer set serves every size of one token count, and a
    count outside the profiles is refused naming the rebuild."""
    from kiln_server.engines.sample_inputs import sample_inputs
    from kiln_server.engines.tensorrt_engine import TensorRTEngine

    dims = FluxDims(clip_hidden_size=8, t5_hidden_size=8, t5_tokens=4, guidance_embeds=True)
    spec = flux_component_specs(dims)["transformer"]
    plan = resolve_plan(ProfileFlags(), ShapeRequest(1, 64, 64), ModelLimits(32, 64, 2), 16)
    ranges = component_profiles(spec, plan)
    fake = FluxFakeCudaEngine(spec, ranges)
    engine = TensorRTEngine(spec, fake, FakeRuntime(fake), cuda_graphs=False)  # type: ignore[arg-type]
    engine.set_device_memory(0, 1024)
    assert engine.max_batch == 2
    for size in ((64, 32), (32, 64)):  # 8 tokens either way: one buffer set
        inputs = sample_inputs(spec, ShapeRequest(2, *size), seed=1)
        out = engine.infer(inputs)["noise_pred"]
        assert torch.equal(out, 2 * inputs["hidden_states"] + 1)
    assert len(engine._buffers._entries) == 1
    with pytest.raises(EngineError, match="no profile for batch 1 of 36 image tokens"):
        engine.infer(sample_inputs(spec, ShapeRequest(1, 96, 96), seed=2))


def test_a_flux_tensorrt_build_on_a_gpu_without_bf16_names_the_alternatives(
    tmp_path: Path, kiln_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kiln_server.engines.machine
    from kiln_build.build import BuildOptions, run_build
    from kiln_server.engines.manifest import MachineInfo
    from kiln_server.models.tiny_flux import ensure_tiny_flux

    t4 = MachineInfo("Tesla T4", "7.5", "10.3.0.26", "12.4")
    machine = kiln_server.engines.machine
    monkeypatch.setattr(machine, "require_tensorrt", lambda purpose: FakeTensorRT())
    monkeypatch.setattr(machine, "probe_machine", lambda *args, **kwargs: t4)
    folder = ensure_tiny_flux(kiln_cache_dir / "models", guidance=True)
    with pytest.raises(EngineError, match=r"needs compute capability 8\.0 or newer; Tesla T4"):
        run_build(BuildOptions(folder, tmp_path / "f", "tensorrt", "f", progress=False))
    assert not (tmp_path / "f").exists()  # refused before anything was written
