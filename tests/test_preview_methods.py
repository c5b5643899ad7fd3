"""Preview methods: the latent-to-RGB map and the model's learned preview decoder.

Validation resolves the method against what the model's engines serve, the pipeline draws
the decoder's previews exactly as AutoencoderTiny decodes the predicted clean latents, the
loader finds a model's decoder (its own folder or a config's override), and a real server
reports the methods and serves them.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from e2e_support import (
    decode,
    expect_error,
    field_violations,
    generate,
    of_kind,
    open_stub,
    request,
)
from test_client_support import FakeKiln, completed, image, progress, running_fake_server, started

from kiln_client import generate_cli
from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.proto.kiln.v1 import generation_service_pb2_grpc as pb_grpc
from kiln_client.requests import build_request
from kiln_server.engines.limits import EngineLimits
from kiln_server.models.loader import (
    ModelFolderError,
    find_preview_decoder,
    load_modules,
    read_model_files,
)
from kiln_server.models.registry import ModelRegistry, make_spec
from kiln_server.pipeline.params import GenerationParams, PreviewParams
from kiln_server.pipeline.sdxl import SDXLPipeline
from kiln_server.validation import RequestInvalid, validate_request

MODEL = "tiny"
WITH_DECODER = EngineLimits(size_multiple=8, preview_decoder=True)
WITHOUT_DECODER = EngineLimits(size_multiple=8)


@pytest.fixture(scope="module")
def plain_model_path(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model without its preview decoder: a model that has none."""
    folder = tmp_path_factory.mktemp("plain") / "tiny-plain"
    shutil.copytree(tiny_model_path, folder, ignore=shutil.ignore_patterns("preview_decoder"))
    return folder


def validate_with(
    limits: EngineLimits | None, tiny_model_path: Path, message: pb.GenerateRequest
) -> GenerationParams:
    registry = ModelRegistry(
        models={MODEL: make_spec(MODEL, tiny_model_path, {})}, default_model=MODEL
    )
    return validate_request(
        message, registry, lambda _m, _t: 3, lambda _m: 77, lambda _model: limits
    )


def preview_request(method: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt="a teapot", preview=pb.PreviewOptions(every_n_steps=1, method=method)
    )


@pytest.mark.parametrize(
    ("limits", "method", "expected"),
    [
        (WITH_DECODER, pb.PREVIEW_METHOD_UNSPECIFIED, "decoder"),
        (WITH_DECODER, pb.PREVIEW_METHOD_DECODER, "decoder"),
        (WITH_DECODER, pb.PREVIEW_METHOD_LATENT_RGB, "latent_rgb"),
        (WITHOUT_DECODER, pb.PREVIEW_METHOD_UNSPECIFIED, "latent_rgb"),
        (WITHOUT_DECODER, pb.PREVIEW_METHOD_LATENT_RGB, "latent_rgb"),
        (None, pb.PREVIEW_METHOD_UNSPECIFIED, "latent_rgb"),
    ],
)
def test_validation_resolves_the_method(
    tiny_model_path: Path, limits: EngineLimits | None, method: int, expected: str
) -> None:
    params = validate_with(limits, tiny_model_path, preview_request(method))
    assert params.preview.method == expected


@pytest.mark.parametrize(
    ("limits", "method", "words"),
    [
        (WITHOUT_DECODER, pb.PREVIEW_METHOD_DECODER, "no learned preview decoder"),
        (WITH_DECODER, 99, "unknown preview method 99"),
    ],
)
def test_unservable_method_names_preview_method(
    tiny_model_path: Path, limits: EngineLimits, method: int, words: str
) -> None:
    with pytest.raises(RequestInvalid) as raised:
        validate_with(limits, tiny_model_path, preview_request(method))
    (violation,) = raised.value.violations
    assert violation.field == "preview.method"
    assert words in violation.description


def test_engine_limits_list_the_best_method_first() -> None:
    assert WITH_DECODER.preview_methods == ("decoder", "latent_rgb")
    assert WITHOUT_DECODER.preview_methods == ("latent_rgb",)


# ------------------------------------------------------------------ pipeline


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1] -> uint8 [H, N*W, 3], as the pipeline rounds final images."""
    strip = torch.cat(list(images.float()), dim=-1)
    rgb = (strip / 2 + 0.5).clamp(0, 1).permute(1, 2, 0)
    return (rgb * 255).round().to(torch.uint8)


def test_decoder_preview_is_autoencoder_tiny_of_the_denoised_latents(
    tiny_pipeline: Any, tiny_model_path: Path
) -> None:
    from diffusers import AutoencoderTiny

    params = GenerationParams(
        prompt="a teapot", width=96, height=64, num_outputs=2, num_inference_steps=3, seed=5
    )
    state = tiny_pipeline.prepare(params)
    tiny_pipeline.denoise_step([state])
    assert state.denoised is not None
    pixels = tiny_pipeline.preview_pixels(state, "decoder")
    reference = AutoencoderTiny.from_pretrained(tiny_model_path / "preview_decoder").float()
    with torch.inference_mode():
        expected = to_uint8(reference.eval().decode(state.denoised).sample)
    assert pixels.shape == (64, 192, 3) and pixels.dtype == torch.uint8
    assert torch.equal(pixels, expected)
    # The model's best is its decoder; the latent map stays at latent size.
    assert torch.equal(tiny_pipeline.preview_pixels(state), pixels)
    assert tiny_pipeline.preview_pixels(state, "latent_rgb").shape == (8, 24, 3)


def test_decoder_preview_is_downscaled_on_the_device_to_the_preview_size(
    tiny_pipeline: Any,
) -> None:
    params = GenerationParams(prompt="a teapot", width=96, height=64, num_outputs=2, seed=5)
    state = tiny_pipeline.prepare(params)
    options = PreviewParams(every_n_steps=1, max_size=48, method="decoder")
    size = tiny_pipeline.preview_size(state, options)
    assert tiny_pipeline.preview_pixels(state, "decoder", size).shape == (16, 48, 3)
    preview = tiny_pipeline.preview(state, options)
    assert (preview.width, preview.height) == (48, 16)
    # Never upscaled past the final images side by side (192x64).
    big = tiny_pipeline.preview(state, replace(options, max_size=1024))
    assert (big.width, big.height) == (192, 64)
    assert decode(big.data).size == (192, 64)


def test_a_model_without_a_decoder_previews_with_the_latent_map(
    tiny_pipeline: Any, plain_model_path: Path
) -> None:
    files = read_model_files(plain_model_path)
    assert files.preview_decoder_path is None
    engines = replace(tiny_pipeline.engines, preview_decoder=None)
    pipeline = SDXLPipeline(files, engines)
    assert pipeline.limits.preview_methods == ("latent_rgb",)
    state = pipeline.prepare(GenerationParams(prompt="a teapot", width=64, height=64))
    assert pipeline.preview_pixels(state).shape == (8, 8, 3)
    with pytest.raises(ValueError, match="decoder"):
        pipeline.preview_pixels(state, "decoder")


# ------------------------------------------------------------------ loading


def test_a_config_may_name_another_preview_decoder(
    tiny_model_path: Path, plain_model_path: Path, tmp_path: Path
) -> None:
    decoder = tiny_model_path / "preview_decoder"
    assert find_preview_decoder(tiny_model_path) == decoder
    assert find_preview_decoder(plain_model_path) is None
    assert find_preview_decoder(plain_model_path, decoder) == decoder
    with pytest.raises(ModelFolderError, match="AutoencoderTiny"):
        find_preview_decoder(plain_model_path, tmp_path / "missing")
    # Relative to the config's folder, like `path`.
    shutil.copytree(decoder, tmp_path / "taesd")
    config = {
        "_config_dir": str(tmp_path),
        "models": [{"name": "plain", "path": str(plain_model_path), "preview_decoder": "taesd"}],
    }
    spec = ModelRegistry.from_config(config, tmp_path / "cache").models["plain"]
    assert spec.preview_decoder == (tmp_path / "taesd").resolve()
    files = read_model_files(plain_model_path, spec.preview_decoder)
    assert files.preview_decoder_path == spec.preview_decoder
    modules = load_modules(plain_model_path, preview_decoder=spec.preview_decoder)
    assert type(modules.preview_decoder).__name__ == "AutoencoderTiny"
    assert load_modules(plain_model_path).preview_decoder is None


# ------------------------------------------------------------------ clients


def test_build_request_carries_the_method() -> None:
    assert build_request("x", preview_every=1).preview.method == pb.PREVIEW_METHOD_UNSPECIFIED
    message = build_request("x", preview_every=1, preview_method="decoder")
    assert message.preview.method == pb.PREVIEW_METHOD_DECODER
    message = build_request("x", preview_every=1, preview_method="latent-rgb")
    assert message.preview.method == pb.PREVIEW_METHOD_LATENT_RGB
    with pytest.raises(ValueError, match="preview_method"):
        build_request("x", preview_every=1, preview_method="vae")


@pytest.fixture
def kiln() -> Iterator[FakeKiln]:
    with running_fake_server() as fake:
        yield fake


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="kiln")
    generate_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args))


@pytest.mark.parametrize(
    ("flags", "method"),
    [
        ((), pb.PREVIEW_METHOD_UNSPECIFIED),
        (("--preview-method", "decoder"), pb.PREVIEW_METHOD_DECODER),
        (("--preview-method", "latent-rgb"), pb.PREVIEW_METHOD_LATENT_RGB),
    ],
)
def test_cli_preview_method_flag(
    kiln: FakeKiln, tmp_path: Path, flags: tuple[str, ...], method: int
) -> None:
    kiln.service.script = [
        started(steps=1),
        progress(1, 1, preview=b"p"),
        image(0, 1, b"i"),
        completed(),
    ]
    code = run_cli(
        "generate", "x", "--server", kiln.address, "--out", str(tmp_path / "t.png"),
        "--previews", str(tmp_path / "p"), *flags,
    )  # fmt: skip
    assert code == 0
    assert kiln.service.requests[0].preview.method == method


def test_models_lists_the_preview_methods(
    kiln: FakeKiln, capsys: pytest.CaptureFixture[str]
) -> None:
    kiln.service.models = pb.ListModelsResponse(
        default_model="tiny",
        models=[
            pb.ModelInfo(
                name="tiny",
                preview_methods=["decoder", "latent_rgb"],
                default_preview_method="decoder",
            )
        ],
    )
    assert run_cli("models", "--server", kiln.address) == 0
    assert "previews: decoder (default), latent_rgb" in capsys.readouterr().out


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def two_model_server(
    tmp_path_factory: pytest.TempPathFactory,
    kiln_cache_dir: Path,
    tiny_model_path: Path,
    plain_model_path: Path,
) -> Iterator[Any]:
    """A real server with the tiny model (it has a decoder) and a copy without one."""
    from conftest import start_server

    config = f"""
[server]
default_model = "tiny"

[[models]]
name = "tiny"
path = "{tiny_model_path}"
default_num_inference_steps = 4

[[models]]
name = "plain"
path = "{plain_model_path}"
default_num_inference_steps = 4
"""
    server = start_server(
        tmp_path_factory.mktemp("preview-server"),
        kiln_cache_dir,
        "--backend",
        "torch",
        config=config,
    )
    yield server
    server.terminate()


@pytest.fixture(scope="module")
def stub(two_model_server: Any) -> Iterator[pb_grpc.GenerationServiceStub]:
    with open_stub(two_model_server.address) as generation_stub:
        yield generation_stub


def test_list_models_reports_preview_methods(stub: pb_grpc.GenerationServiceStub) -> None:
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=60).models}
    assert list(models["tiny"].preview_methods) == ["decoder", "latent_rgb"]
    assert models["tiny"].default_preview_method == "decoder"
    assert list(models["plain"].preview_methods) == ["latent_rgb"]
    assert models["plain"].default_preview_method == "latent_rgb"


@pytest.mark.parametrize("method", [pb.PREVIEW_METHOD_DECODER, pb.PREVIEW_METHOD_LATENT_RGB])
def test_previews_by_each_method_have_the_right_size(
    stub: pb_grpc.GenerationServiceStub, method: int
) -> None:
    events = generate(
        stub,
        request(
            seed=3,
            num_outputs=2,
            width=96,
            height=64,
            preview={"every_n_steps": 2, "max_size": 48, "method": method},
        ),
    )
    previews = [p for p in of_kind(events, "progress") if p.preview]
    assert [p.step for p in previews] == [2, 4]
    for p in previews:
        picture = decode(p.preview)
        assert picture.size == (p.preview_width, p.preview_height) == (48, 16)


def test_decoder_on_a_model_without_one_is_invalid(stub: pb_grpc.GenerationServiceStub) -> None:
    message = request(model="plain", preview={"every_n_steps": 1, "method": 2})
    error = expect_error(lambda: generate(stub, message))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "preview decoder" in field_violations(error)["preview.method"]
