"""Per-row LoRAs as graph inputs: the UNet formulation that exports to ONNX and TensorRT.

Contract. `LoraUNetModule` wraps the UNet component module (engines/torch_modules.py) and
takes, after its usual inputs, the graph inputs `LoraInputs` declares
(engines/components.py): per row up to k (slot, scale) pairs (`lora_slots` [rows, k] int64,
`lora_scales` [rows, k] float32; unused pairs are slot 0 at scale 0), and per layer a LoRA
could target (the layers `install_row_lora` wraps) its down stack [slots + 1, R, in(, kh,
kw)] and up stack [slots + 1, out, R], exactly as an `AdapterStack` holds them: zero-padded
to R, slot 0 all zero, each slot's up already multiplied by alpha / r. Each such layer then
computes, with pure tensor operations and no host-side branch, so one traced graph serves
any assignment and any adapters:

    y = base(x);   y[row] += sum_j scale[row, j] * up[slot[row, j]] @ (down[slot[row, j]] @ x[row])

- Linear: the rows' slots are gathered ([rows, k*R, in] and [rows, out, k*R], the scale
  folded into up), then two batched matmuls: 2*rows*T*k*R*(in+out) flops beside the base
  layer's rows*T*in*out, plus the gather of rows*k*R*(in+out) weights.
- Conv2d: a conv's kernel cannot differ per row in one traced Conv (its group count would
  be the dynamic row count), so the down conv runs over every adapter slot at once
  (slots*R output channels, the base layer's stride and padding), each row's channels are
  weighted by its per-slot scale (0 for slots it does not use), and one 1x1 conv over
  slots*R channels adds them up: the cost grows with the slots built, not the rows.
- Rows with no LoRA (every scale 0) get the base layer's output bit for bit: the sum is
  selected per row (`where`), not added, so even a base output of -0.0 stays -0.0. A row
  with a LoRA adds an exact zero in the layers its adapters do not target (its slot there
  is all zero), which only differs from not adding in the sign of a zero.

Every layer computes its delta for every row: the price of one graph for all assignments is
that a batch without LoRA rows still pays the gathers and matmuls (a few percent per layer
when R is much smaller than in and out, more for convs, which run slots*R channels).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from kiln_server.engines.base import EngineError
from kiln_server.engines.components import LoraInputs, LoraLayerSpec
from kiln_server.lora.layers import RowLoraConv2d, RowLoraLayers, install_row_lora


class _Rows:
    """The per-call LoRA inputs every wrapped layer of one UNet reads (set per forward)."""

    def __init__(self) -> None:
        self.slots: torch.Tensor | None = None
        self.scales: torch.Tensor | None = None
        self.active: torch.Tensor | None = None
        self.stacks: tuple[torch.Tensor, ...] = ()

    def inputs(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(slots, scales, down stack, up stack) for the layer at `index`."""
        if self.slots is None or self.scales is None:
            raise RuntimeError("a LoRA graph layer ran outside LoraUNetModule.forward")
        return self.slots, self.scales, self.stacks[2 * index], self.stacks[2 * index + 1]

    def select(self, base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """base + delta on rows with a LoRA, the base output itself on the others."""
        assert self.active is not None
        mask = self.active.reshape(-1, *([1] * (base.dim() - 1)))
        return torch.where(mask, base + delta, base)


class _GraphLoraLayer(nn.Module):
    """The base layer (kept as `.base`) plus this layer's slice of the per-call inputs."""

    def __init__(self, base: nn.Module, rows: _Rows, index: int) -> None:
        super().__init__()
        self.base = base
        self._rows = rows
        self._index = index

    def _delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base output, plus each LoRA row's delta."""
        out: torch.Tensor = self.base(x)
        return self._rows.select(out, self._delta(x, out))


class GraphLoraLinear(_GraphLoraLayer):
    """An `nn.Linear` plus per-row LoRA deltas gathered by slot (see the module docstring)."""

    def _delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        slots, scales, down, up = self._rows.inputs(self._index)
        k = slots.shape[1]
        rank, features = down.shape[1], down.shape[2]
        outs = up.shape[1]
        picked_down = down[slots].reshape(-1, k * rank, features)
        picked_up = up[slots] * scales[:, :, None, None]
        picked_up = picked_up.permute(0, 2, 1, 3).reshape(-1, outs, k * rank)
        flat = x.reshape(x.shape[0], -1, features)
        delta = torch.matmul(
            torch.matmul(flat, picked_down.transpose(1, 2)), picked_up.transpose(1, 2)
        )
        return delta.reshape(base_out.shape)


class GraphLoraConv2d(_GraphLoraLayer):
    """An `nn.Conv2d` plus per-row LoRA deltas: every slot's down conv, weighted per row."""

    base: nn.Conv2d

    def _delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        slots, scales, down, up = self._rows.inputs(self._index)
        stacked, rank = down.shape[0], down.shape[1]
        adapters = stacked - 1  # slot 0 is all zero: no need to run it
        kernel = down[1:].reshape(adapters * rank, *down.shape[2:])
        hidden = F.conv2d(x, kernel, None, self.base.stride, self.base.padding)
        # weight[row, s - 1]: the row's total scale for slot s (0 when it does not use it).
        chosen = slots.unsqueeze(-1) == torch.arange(1, stacked, device=slots.device)
        weight = (chosen.to(scales.dtype) * scales.unsqueeze(-1)).sum(dim=1)
        per_channel = weight.unsqueeze(-1).expand(-1, adapters, rank).reshape(-1, adapters * rank)
        hidden = hidden * per_channel[:, :, None, None]
        combine = up[1:].permute(1, 0, 2).reshape(up.shape[1], adapters * rank)
        return F.conv2d(hidden, combine[:, :, None, None])


class LoraUNetModule(nn.Module):
    """The UNet component module with per-row LoRA inputs; see the module docstring.

    `forward(sample, timestep, encoder_hidden_states, text_embeds, time_ids, lora_slots,
    lora_scales, *stacks)`, the stacks in `lora.layers` order, down then up.
    """

    def __init__(self, unet_module: nn.Module, lora: LoraInputs) -> None:
        super().__init__()
        self.inner = unet_module
        self.lora = lora
        self._rows = _Rows()
        unet = unet_module.get_submodule("unet")
        for index, layer in enumerate(lora.layers):
            base = unet.get_submodule(layer.name)
            parent_name, _, child = layer.name.rpartition(".")
            parent = unet.get_submodule(parent_name) if parent_name else unet
            if type(base) is nn.Linear:
                wrapper: _GraphLoraLayer = GraphLoraLinear(base, self._rows, index)
            elif type(base) is nn.Conv2d:
                wrapper = GraphLoraConv2d(base, self._rows, index)
            else:
                raise ValueError(
                    f"LoRA layer {layer.name!r} is a {type(base).__name__}, not a Linear or Conv2d"
                )
            setattr(parent, child, wrapper)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
        lora_slots: torch.Tensor,
        lora_scales: torch.Tensor,
        *stacks: torch.Tensor,
    ) -> torch.Tensor:
        """The noise prediction, each row with its own adapters."""
        if len(stacks) != 2 * len(self.lora.layers):
            raise ValueError(
                f"the LoRA UNet takes {2 * len(self.lora.layers)} stacks, got {len(stacks)}"
            )
        rows = self._rows
        rows.slots, rows.scales, rows.stacks = lora_slots, lora_scales, stacks
        rows.active = (lora_scales != 0).any(dim=1)
        try:
            result: torch.Tensor = self.inner(
                sample, timestep, encoder_hidden_states, text_embeds, time_ids
            )
        finally:
            rows.slots = rows.scales = rows.active = None
            rows.stacks = ()
        return result


def lora_layer_specs(layers: RowLoraLayers) -> tuple[LoraLayerSpec, ...]:
    """The declaration of every layer `layers` wraps, in their order."""
    specs = []
    for name in layers:
        layer = layers[name]
        if isinstance(layer, RowLoraConv2d):
            base = layer.base
            specs.append(
                LoraLayerSpec(name, (base.in_channels, *base.kernel_size), base.out_channels)
            )
        else:
            specs.append(LoraLayerSpec(name, (layer.base.in_features,), layer.base.out_features))
    return tuple(specs)


@dataclass(frozen=True)
class ShapeOnlyUNet:
    """A UNet's per-row LoRA layers without its weights, and its diffusers config (which
    reading kohya files needs)."""

    layers: RowLoraLayers
    config: Any


def shape_only_unet(
    unet_config: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> ShapeOnlyUNet:
    """The per-row LoRA layers of a UNet with `unet_config` (a config dict), weightless.

    The UNet is built on the meta device (no memory), the per-row layers installed on it,
    and each base layer's weight replaced by an empty tensor on `device` in `dtype`: an
    `AdapterStack` over these layers checks adapters against the layer shapes and allocates
    its slot tensors on `device`, which is all a compiled engine needs of the torch UNet.
    """
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    layers = install_row_lora(unet)
    for name in layers:
        base = layers[name].base
        base.weight = nn.Parameter(torch.empty(0, device=device, dtype=dtype), requires_grad=False)
        base.bias = None
    return ShapeOnlyUNet(layers, unet.config)


def unet_config_of(model_path: Path) -> dict[str, Any]:
    """The UNet config (unet/config.json) of a diffusers model folder; EngineError naming
    the file when it cannot be read."""
    path = model_path / "unet" / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EngineError(f"cannot read the UNet config {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise EngineError(f"the UNet config {path} must hold a JSON object")
    return config


def lora_inputs(
    layers: RowLoraLayers | Iterable[LoraLayerSpec], *, slots: int, max_rank: int, max_loras: int
) -> LoraInputs:
    """The LoRA graph inputs for `layers` with `slots` adapters of rank up to `max_rank` and
    `max_loras` per row. Raises ValueError naming a value below 1."""
    for label, value in (
        ("lora_slots", slots),
        ("max_lora_rank", max_rank),
        ("max_loras_per_request", max_loras),
    ):
        if value < 1:
            raise ValueError(f"{label} must be at least 1, not {value}")
    specs = lora_layer_specs(layers) if isinstance(layers, RowLoraLayers) else tuple(layers)
    return LoraInputs(slots=slots, max_rank=max_rank, max_loras=max_loras, layers=specs)
