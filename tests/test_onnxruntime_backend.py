"""The onnxruntime backend: resident ONNX engines behind the same interface as torch.

Engines agree with the torch reference tensor by tensor, reuse their buffers per shape,
and a full generation (in-process, and through `kiln serve --backend onnxruntime`) gives
the same image as the torch backend for the same request and seed.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import start_server
from test_export_support import MODEL_NAME, copy_engines, tiny_engines

from kiln_server.engines.base import EngineError, EngineSet
from kiln_server.engines.components import COMPONENT_NAMES, ShapeRequest, sdxl_component_specs
from kiln_server.engines.sample_inputs import sample_inputs
from kiln_server.pipeline.params import GenerationParams, ImageConditioning
from kiln_server.pipeline.schedulers import scheduler_names

MIN_PSNR_DB = 50.0  # the issue asks for 40 dB; measured here: ~89 dB (one uint8 level, rarely)
SERVER_CONFIG = f"""
[[models]]
name = "{MODEL_NAME}"
builtin = "{MODEL_NAME}"
default_num_inference_steps = 8
"""


@pytest.fixture(scope="session")
def engines_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Path:
    return tiny_engines(tmp_path_factory, tiny_model_path)


@pytest.fixture(scope="module")
def files(tiny_model_path: Path) -> Any:
    from kiln_server.models.loader import read_model_files

    return read_model_files(tiny_model_path)


@pytest.fixture(scope="module")
def ort_engines(files: Any, engines_dir: Path) -> EngineSet:
    from kiln_server.engines.loading import load_engine_set

    return load_engine_set("onnxruntime", files, engines_dir)


@pytest.fixture(scope="module")
def ort_pipeline(files: Any, ort_engines: EngineSet) -> Any:
    from kiln_server.pipeline.sdxl import SDXLPipeline

    return SDXLPipeline(files, ort_engines)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("component", COMPONENT_NAMES)
def test_engines_match_torch_engines(
    files: Any, ort_engines: EngineSet, tiny_pipeline: Any, component: str
) -> None:
    spec = sdxl_component_specs(files.dims)[component]
    inputs = sample_inputs(spec, ShapeRequest(3, 96, 64), seed=31)
    expected = getattr(tiny_pipeline.engines, component).infer(inputs)
    actual = getattr(ort_engines, component).infer(inputs)
    assert set(actual) == {t.name for t in spec.outputs}
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype and got.shape == want.shape
        scale = float(want.abs().max())
        assert float((got - want).abs().max()) <= 1e-3 * scale, name


def test_outputs_belong_to_the_caller(files: Any, ort_engines: EngineSet) -> None:
    """A later call never writes into an earlier call's outputs (schedulers keep them)."""
    spec = sdxl_component_specs(files.dims)["vae_decoder"]
    first = ort_engines.vae_decoder.infer(sample_inputs(spec, ShapeRequest(1, 64, 64), seed=1))
    kept = first["images"].clone()
    second = ort_engines.vae_decoder.infer(sample_inputs(spec, ShapeRequest(1, 64, 64), seed=2))
    assert torch.equal(first["images"], kept)
    assert second["images"].data_ptr() != first["images"].data_ptr()
    assert not torch.equal(second["images"], kept)


@pytest.mark.parametrize("guidance", [1.0, 5.0])
@pytest.mark.parametrize("scheduler", scheduler_names())
def test_every_scheduler_matches_torch(
    ort_pipeline: Any, tiny_pipeline: Any, scheduler: str, guidance: float
) -> None:
    """Multistep schedulers keep past predictions: on onnxruntime, as on torch, they must
    still hold what the UNet returned when the next step runs."""
    params = GenerationParams(
        prompt="a yellow triangle on a purple background",
        scheduler=scheduler,
        guidance_scale=guidance,
        num_inference_steps=6,
        num_outputs=2,
        seed=11,
    )
    reference = tiny_pipeline.generate(params)
    images = ort_pipeline.generate(params)
    for image, want in zip(images, reference, strict=True):
        assert psnr(image, want) >= MIN_PSNR_DB, scheduler


@pytest.mark.parametrize("masked", [False, True], ids=["img2img", "inpaint"])
def test_image_conditioning_matches_torch(
    ort_pipeline: Any, tiny_pipeline: Any, masked: bool
) -> None:
    """The VAE encoder's ONNX graph runs in the loop: img2img and inpainting give the
    torch backend's images."""
    from test_image_pipeline import background_mask, product_photo

    conditioning = ImageConditioning(
        product_photo(64, 64), 0.6, background_mask(64, 64) if masked else None
    )
    params = GenerationParams(
        prompt="a red circle on a yellow background",
        num_inference_steps=6,
        num_outputs=2,
        seed=5,
        image=conditioning,
    )
    reference = tiny_pipeline.generate(params)
    images = ort_pipeline.generate(params)
    for image, want in zip(images, reference, strict=True):
        assert psnr(image, want) >= MIN_PSNR_DB


def test_decoder_previews_match_torch(ort_pipeline: Any, tiny_pipeline: Any) -> None:
    """The exported preview decoder is loaded and declared, and draws torch's previews."""
    assert ort_pipeline.limits.preview_methods == ("decoder", "latent_rgb")
    params = GenerationParams(
        prompt="a red circle", width=96, height=64, num_outputs=2, num_inference_steps=3, seed=9
    )
    states = [tiny_pipeline.prepare(params), ort_pipeline.prepare(params)]
    tiny_pipeline.denoise_step([states[0]])
    ort_pipeline.denoise_step([states[1]])
    for size in (None, 48):
        want = tiny_pipeline.preview_pixels(states[0], "decoder", size).numpy()
        got = ort_pipeline.preview_pixels(states[1], "decoder", size).numpy()
        assert got.shape == want.shape
        assert psnr(got, want) >= MIN_PSNR_DB


def test_engines_without_the_models_preview_decoder_are_refused(
    files: Any, engines_dir: Path, tmp_path: Path
) -> None:
    """Engines built before the model gained its preview decoder name the rebuild."""
    from kiln_server.engines.loading import load_engine_set
    from kiln_server.engines.manifest import read_manifest, write_manifest

    stale = copy_engines(engines_dir, tmp_path)
    manifest = read_manifest(stale)
    del manifest.onnx["preview_decoder"]
    write_manifest(stale, manifest)
    with pytest.raises(EngineError, match=r"preview_decoder.*kiln build-engines"):
        load_engine_set("onnxruntime", files, stale)


def test_declared_size_step_is_what_the_graphs_run(files: Any, ort_pipeline: Any) -> None:
    """The exported UNet fixes its upsampling shapes: sizes must divide by every halving.

    The tiny UNet halves once, so its graphs need multiples of 16 pixels; 72x88 (a multiple
    of 8, which eager torch runs) fails in the graph, and the declaration says so.
    """
    assert ort_pipeline.limits.size_multiple == files.dims.graph_size_multiple == 16
    with pytest.raises(EngineError):
        ort_pipeline.generate(
            GenerationParams(prompt="x", width=72, height=88, num_inference_steps=1)
        )
    (image,) = ort_pipeline.generate(
        GenerationParams(prompt="x", width=80, height=96, num_inference_steps=1)
    )
    assert image.shape == (96, 80, 3)


def test_inputs_are_converted_to_declared_dtypes(files: Any, ort_engines: EngineSet) -> None:
    spec = sdxl_component_specs(files.dims)["text_encoder"]
    ids = sample_inputs(spec, ShapeRequest(2, 0, 0), seed=4)["input_ids"]
    as_int32 = ort_engines.text_encoder.infer({"input_ids": ids})["hidden_states"].clone()
    as_int64 = ort_engines.text_encoder.infer({"input_ids": ids.long()})["hidden_states"]
    assert torch.equal(as_int32, as_int64)


def test_bad_inputs_raise_engine_errors(files: Any, ort_engines: EngineSet) -> None:
    spec = sdxl_component_specs(files.dims)["unet"]
    inputs = sample_inputs(spec, ShapeRequest(2, 64, 64), seed=5)
    with pytest.raises(EngineError, match="unet takes inputs"):
        ort_engines.unet.infer({k: v for k, v in inputs.items() if k != "time_ids"})
    with pytest.raises(EngineError, match="batch=1 on axis 0 but another input has batch=2"):
        ort_engines.unet.infer({**inputs, "timestep": inputs["timestep"][:1]})


@pytest.mark.parametrize(
    "params",
    [
        GenerationParams(prompt="a red circle on a blue square", seed=42, num_inference_steps=8),
        GenerationParams(
            prompt="two green triangles",
            negative_prompt="blurry",
            width=96,
            height=64,
            num_outputs=2,
            num_inference_steps=6,
            guidance_scale=5.0,
            seed=7,
        ),
    ],
    ids=["default-size", "non-square-two-outputs"],
)
def test_generation_matches_the_torch_backend(
    ort_pipeline: Any, tiny_pipeline: Any, params: GenerationParams
) -> None:
    reference = tiny_pipeline.generate(params)
    images = ort_pipeline.generate(params)
    assert len(images) == len(reference) == params.num_outputs
    for image, want in zip(images, reference, strict=True):
        assert image.shape == want.shape == (params.height, params.width, 3)
        assert psnr(image, want) >= MIN_PSNR_DB


def test_kiln_serve_onnxruntime_gives_the_torch_image(
    tmp_path: Path, kiln_cache_dir: Path, engines_dir: Path, tiny_pipeline: Any
) -> None:
    """`kiln serve --backend onnxruntime --engines DIR` serves the same image as torch."""
    from PIL import Image

    from kiln_client.client import KilnClient
    from kiln_client.errors import InvalidArgument

    server = start_server(
        tmp_path / "server",
        kiln_cache_dir,
        "--backend",
        "onnxruntime",
        "--engines",
        str(engines_dir.parent),
        config=SERVER_CONFIG,
    )
    try:
        with KilnClient(server.address, timeout=120) as client:
            result = client.generate("a red circle on a blue square", seed=42)
            (info,) = client.list_models().models
            # 72x88 is a multiple of 8 (eager torch runs it) but not of the graphs' 16.
            with pytest.raises(InvalidArgument) as raised:
                client.generate("a red circle", width=72, height=88)
        assert '"backend": "onnxruntime"' in server.logs()
    finally:
        assert server.terminate() == 0
    assert (info.backend, info.device, info.size_multiple) == ("onnxruntime", "cpu fp32", 16)
    assert info.backend_reason == "requested with --backend"
    assert dict(raised.value.field_violations) == {
        "width": "must be a multiple of 16 for this model's engines, got 72",
        "height": "must be a multiple of 16 for this model's engines, got 88",
    }
    served = np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB"))
    (reference,) = tiny_pipeline.generate(
        GenerationParams(prompt="a red circle on a blue square", seed=42, num_inference_steps=8)
    )
    assert psnr(served, reference) >= MIN_PSNR_DB


def test_kiln_serve_refuses_tampered_engines(
    tmp_path: Path, kiln_cache_dir: Path, engines_dir: Path
) -> None:
    """A server whose engines do not match exits 1 with the message, before SERVING."""
    root = tmp_path / "engines"
    copy_engines(engines_dir, root)
    (root / MODEL_NAME / "unet.onnx").unlink()
    server = start_server(
        tmp_path / "server",
        kiln_cache_dir,
        "--backend",
        "onnxruntime",
        "--engines",
        str(root),
        config=SERVER_CONFIG,
        wait_serving=False,
    )
    deadline = time.monotonic() + 120
    while server.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.process.wait(timeout=5) == 1
    logs = server.logs()
    assert "unet.onnx for 'unet' is missing; rebuild with: kiln build-engines" in logs
    assert "Traceback" not in logs
