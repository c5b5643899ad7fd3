"""ONNX export of a FLUX model's components, from the FLUX declarations.

The transformer does not trace to a size-independent ONNX graph as diffusers writes it:
`torch.nn.RMSNorm` (its q/k norms) has no ONNX export at opset 17 with the TorchScript
exporter, and diffusers' `apply_rotary_emb` reshapes with the traced sequence length baked
in, so a graph traced at one image size fails at another. `onnx_ready_transformer` swaps
each RMSNorm for the same arithmetic in plain ops, and `traceable_rotary_embedding` swaps
the rotary embedding for an equal one that reshapes with `unflatten`. Both compute what
diffusers computes; the graph then runs at any image size. The other components (CLIP
pooled, T5, the 16-channel VAE) export as they are.

`kiln build-engines` exports FLUX models through these (kiln_build.targets), and the
server serves the graphs on onnxruntime and their TensorRT engines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln_build.export import ExportResult, export_component, export_request
from kiln_server.engines.components import ShapeRequest
from kiln_server.engines.flux_components import FluxDims, flux_component_specs
from kiln_server.engines.flux_torch import flux_component_module
from kiln_server.models.flux_loader import load_flux_modules, read_flux_model_files


class DecomposedRMSNorm(nn.Module):
    """`torch.nn.RMSNorm` in plain ops (float32 statistics, as torch computes them)."""

    def __init__(self, norm: nn.RMSNorm) -> None:
        super().__init__()
        self.eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        self.weight = norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            x = x * self.weight.float()
        return x.to(dtype)


def onnx_ready_transformer(module: nn.Module) -> int:
    """Swap every RMSNorm inside `module` for DecomposedRMSNorm, in place; return how many."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.RMSNorm):
                setattr(parent, name, DecomposedRMSNorm(child))
                swapped += 1
    return swapped


def _rotary(
    x: torch.Tensor,
    freqs_cis: tuple[torch.Tensor, torch.Tensor],
    use_real: bool = True,
    use_real_unbind_dim: int = -1,
    sequence_dim: int = 2,
) -> torch.Tensor:
    """diffusers' `apply_rotary_emb` (real, unbind dim -1), reshaping with `unflatten` so a
    trace keeps the sequence length symbolic."""
    cos, sin = freqs_cis
    cos = cos[None, :, None, :] if sequence_dim == 1 else cos[None, None]
    sin = sin[None, :, None, :] if sequence_dim == 1 else sin[None, None]
    real, imaginary = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imaginary, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


@contextlib.contextmanager
def traceable_rotary_embedding() -> Iterator[None]:
    """While inside, FLUX's transformer uses `_rotary` for its rotary embedding."""
    from diffusers.models.transformers import transformer_flux

    patched: Any = transformer_flux
    original = patched.apply_rotary_emb
    patched.apply_rotary_emb = _rotary
    try:
        yield
    finally:
        patched.apply_rotary_emb = original


def flux_export_modules(folder: Path, dims: FluxDims) -> dict[str, nn.Module]:
    """The torch module of every FLUX component of the model in `folder` (fp32), the
    transformer's RMSNorms already decomposed; trace the transformer inside
    `flux_trace_context("transformer")`."""
    modules = load_flux_modules(folder, dtype=torch.float32)
    wrapped = {
        name: flux_component_module(spec, modules)
        for name, spec in flux_component_specs(dims).items()
    }
    onnx_ready_transformer(wrapped["transformer"])
    return wrapped


def flux_trace_context(component: str) -> contextlib.AbstractContextManager[None]:
    """What tracing `component` runs inside: the traceable rotary embedding for the
    transformer, nothing for the other components."""
    if component == "transformer":
        return traceable_rotary_embedding()
    return contextlib.nullcontext()


def export_flux_model(
    folder: Path, out_dir: Path, *, size: tuple[int, int] | None = None
) -> dict[str, ExportResult]:
    """Export every declared component of the FLUX model in `folder` to
    `out_dir/<component>.onnx` (fp32, uncleaned), traced at `size` (width, height; default
    64x64 or the model's own default from kiln.json). Raises EngineError naming a component
    that fails to export. `kiln build-engines` exports through kiln_build.targets instead,
    and also cleans and validates the graphs."""
    files = read_flux_model_files(folder)
    width, height = size or (
        int(files.kiln_config.get("default_width", 64)),
        int(files.kiln_config.get("default_height", 64)),
    )
    request = export_request(ShapeRequest(batch=1, height=height, width=width))
    modules = flux_export_modules(folder, files.dims)
    results = {}
    for name, spec in flux_component_specs(files.dims).items():
        with flux_trace_context(name):
            results[name] = export_component(
                spec, modules[name], out_dir / f"{name}.onnx", request=request
            )
    return results
