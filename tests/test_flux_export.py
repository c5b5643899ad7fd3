"""FLUX components export to ONNX and onnxruntime matches torch, the transformer at the
traced image size and at another one (the rotary embedding and RMSNorm rewrites of
kiln_build.flux_export make the graph size-independent). Serving FLUX from these graphs
is not wired yet; this proves the export half."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from kiln_build.flux_export import (
    DecomposedRMSNorm,
    export_flux_model,
    onnx_ready_transformer,
    traceable_rotary_embedding,
)
from kiln_server.engines.components import ShapeRequest
from kiln_server.engines.flux_components import flux_component_specs
from kiln_server.engines.flux_torch import flux_component_module
from kiln_server.engines.sample_inputs import sample_inputs
from kiln_server.models.flux_loader import load_flux_modules, read_flux_model_files
from kiln_server.models.tiny_flux import ensure_tiny_flux


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "schnell"])
def exported(
    request: pytest.FixtureRequest, kiln_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    folder = ensure_tiny_flux(kiln_cache_dir / "models", guidance=request.param)
    out = tmp_path_factory.mktemp("flux-onnx")
    results = export_flux_model(folder, out)
    assert set(results) == set(flux_component_specs(read_flux_model_files(folder).dims))
    return folder, out


@pytest.mark.parametrize("size", [(64, 64), (96, 128)], ids=["traced size", "another size"])
def test_onnxruntime_matches_torch(exported: tuple[Path, Path], size: tuple[int, int]) -> None:
    folder, out = exported
    files = read_flux_model_files(folder)
    modules = load_flux_modules(folder)
    width, height = size
    for name, spec in flux_component_specs(files.dims).items():
        module = flux_component_module(spec, modules)
        inputs = sample_inputs(spec, ShapeRequest(batch=3, height=height, width=width), seed=4)
        session = ort.InferenceSession(
            str(out / f"{name}.onnx"), providers=["CPUExecutionProvider"]
        )
        feed = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
        got = session.run(None, feed)[0]
        with torch.no_grad():
            want = module(*(inputs[t.name] for t in spec.inputs)).numpy()
        scale = max(float(np.abs(want).max()), 1e-6)
        assert np.abs(got - want).max() / scale < 1e-4, name
    # The schnell-style transformer declares (and its graph takes) no guidance input.
    names = {i.name for i in ort.InferenceSession(str(out / "transformer.onnx")).get_inputs()}
    assert ("guidance" in names) == files.dims.guidance_embeds


def test_rewrites_compute_what_diffusers_computes(kiln_cache_dir: Path) -> None:
    folder = ensure_tiny_flux(kiln_cache_dir / "models", guidance=True)
    files = read_flux_model_files(folder)
    spec = flux_component_specs(files.dims)["transformer"]
    module = flux_component_module(spec, load_flux_modules(folder))
    inputs = sample_inputs(spec, ShapeRequest(batch=2, height=96, width=64), seed=2)
    args = [inputs[t.name] for t in spec.inputs]
    with torch.no_grad():
        before = module(*args)
        assert onnx_ready_transformer(module) > 0
        assert any(isinstance(m, DecomposedRMSNorm) for m in module.modules())
        with traceable_rotary_embedding():
            after = module(*args)
    assert torch.allclose(before, after, rtol=1e-5, atol=1e-6)
