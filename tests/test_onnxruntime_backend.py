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
from kiln_server.pipeline.params import GenerationParams

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


def test_output_buffers_are_reused_per_shape(files: Any, ort_engines: EngineSet) -> None:
    spec = sdxl_component_specs(files.dims)["vae_decoder"]
    first_inputs = sample_inputs(spec, ShapeRequest(1, 64, 64), seed=1)
    second_inputs = sample_inputs(spec, ShapeRequest(1, 64, 64), seed=2)
    first = ort_engines.vae_decoder.infer(first_inputs)["images"]
    first_copy = first.clone()
    second = ort_engines.vae_decoder.infer(second_inputs)["images"]
    assert second.data_ptr() == first.data_ptr()  # same buffer, overwritten in place
    assert not torch.equal(second, first_copy)
    other = ort_engines.vae_decoder.infer(sample_inputs(spec, ShapeRequest(2, 64, 96), 3))
    assert other["images"].shape == (2, 3, 64, 96)
    assert other["images"].data_ptr() != first.data_ptr()


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
        assert '"backend": "onnxruntime"' in server.logs()
    finally:
        assert server.terminate() == 0
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
