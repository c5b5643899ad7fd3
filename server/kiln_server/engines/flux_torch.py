"""The torch backend for FLUX: diffusers and transformers modules behind the FLUX
component declarations, Kiln's numerical reference for the family.

Each wrapper takes its declaration's inputs positionally, in declared order, and returns
the declared outputs in order, so the torch engine runs it eagerly and ONNX export can
trace it (export additionally needs the RMSNorm and rotary-embedding rewrites the FLUX
brief describes; the eager wrappers keep diffusers' own code, so CPU fp32 results equal
diffusers' FluxPipeline exactly). The VAE wrappers are SDXL's. TorchEngine is shared with
SDXL: inputs are cast to the compute dtype except `timestep`, outputs come back float32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kiln_server.engines.components import ComponentSpec
from kiln_server.engines.device import Placement
from kiln_server.engines.flux_components import FluxDims, flux_component_specs
from kiln_server.engines.flux_engines import FluxEngineSet
from kiln_server.engines.torch_engine import CUDA_VAE_IMAGES_PER_CALL, TorchEngine, vae_dtype
from kiln_server.engines.torch_modules import VAEDecoderModule, VAEEncoderModule


class ClipPooledModule(nn.Module):
    """CLIP text encoder returning its pooled output (the hidden state at the end token),
    as diffusers' FluxPipeline takes it."""

    def __init__(self, encoder: Any) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids.long(), output_hidden_states=False).pooler_output


class T5EncoderModule(nn.Module):
    """T5 encoder returning its last hidden states; no attention mask (pads attend, as in
    diffusers' FluxPipeline)."""

    def __init__(self, encoder: Any) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids.long(), output_hidden_states=False)[0]


class FluxTransformerModule(nn.Module):
    """FluxTransformer2DModel with its inputs as plain positional tensors; `guidance` is
    passed only to a dev-style model (its declaration has the input)."""

    def __init__(self, transformer: Any) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.transformer(
            hidden_states=hidden_states,
            timestep=timestep,
            guidance=guidance,
            pooled_projections=pooled_projections,
            encoder_hidden_states=encoder_hidden_states,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]


def flux_component_module(spec: ComponentSpec, modules: Any) -> nn.Module:
    """The wrapper for `spec.name` around loaded FluxModules, in eval mode."""
    builders = {
        "text_encoder": lambda: ClipPooledModule(modules.text_encoder),
        "text_encoder_2": lambda: T5EncoderModule(modules.text_encoder_2),
        "transformer": lambda: FluxTransformerModule(modules.transformer),
        "vae_decoder": lambda: VAEDecoderModule(modules.vae),
        "vae_encoder": lambda: VAEEncoderModule(modules.vae),
    }
    if spec.name not in builders:
        raise KeyError(f"no torch module for FLUX component {spec.name!r}")
    module: nn.Module = builders[spec.name]()
    return module.eval()


def load_flux_torch_engines(
    modules: Any, dims: FluxDims, placement: Placement | None = None, *, vae_upcast: bool = True
) -> FluxEngineSet:
    """Wrap loaded FluxModules as a FluxEngineSet on the torch backend, moved to
    `placement`.

    `vae_upcast` is the VAE config's `force_upcast`: with fp16 the VAE then stays fp32.
    With `placement.compile` the transformer is wrapped in torch.compile; with
    `placement.cuda_graphs` each transformer call shape is captured on its first call.
    """
    placement = placement or Placement(torch.device("cpu"), torch.float32)
    device, dtype = placement.device, placement.dtype
    vae_precision = vae_dtype(dtype, vae_upcast)
    for module, precision in (
        (modules.transformer, dtype),
        (modules.text_encoder, dtype),
        (modules.text_encoder_2, dtype),
        (modules.vae, vae_precision),
    ):
        if module.dtype != precision:
            module.to(dtype=precision)
        module.to(device=device)
    pool = torch.cuda.graph_pool_handle() if placement.cuda_graphs else None
    engines: dict[str, TorchEngine] = {}
    for name, spec in flux_component_specs(dims).items():
        module = eager = flux_component_module(spec, modules)
        is_transformer = name == "transformer"
        if is_transformer and placement.compile:
            module = torch.compile(module)
        is_vae = name.startswith("vae")
        engines[name] = TorchEngine(
            spec,
            module,
            device=device,
            dtype=vae_precision if is_vae else dtype,
            cuda_graphs=is_transformer and placement.cuda_graphs,
            graph_pool=pool,
            max_batch=CUDA_VAE_IMAGES_PER_CALL if is_vae and device.type == "cuda" else None,
            eager_module=eager,
        )
    description = placement.describe()
    if vae_precision != dtype:
        description += ", VAE fp32 (force_upcast)"
    return FluxEngineSet(
        backend="torch",
        text_encoder=engines["text_encoder"],
        text_encoder_2=engines["text_encoder_2"],
        transformer=engines["transformer"],
        vae_decoder=engines["vae_decoder"],
        vae_encoder=engines["vae_encoder"],
        device=device,
        placement=description,
    )
