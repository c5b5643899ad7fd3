"""Feeding per-row LoRAs to a compiled UNet (onnxruntime, TensorRT) built with LoRA inputs.

The adapter stack stays the source of truth, exactly as on the torch backend: an
`AdapterStack` over the UNet's weightless per-row layers (`graph.shape_only_unet`) loads,
evicts and zeroes slots in tensors it allocates on the engine's device, and `assign` sets
the rows' `RowAssignment`. Per UNet call, `GraphLoraFeed.inputs` turns that into the
graph's LoRA inputs without copying a stack: each layer's input is the stack's own tensor
(bound by address), and a layer no resident adapter has targeted yet (its slot tensors are
not allocated) is bound to one shared all-zero buffer; only the [rows, k] slots and scales
are made per call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kiln_server.engines.base import EngineError
from kiln_server.engines.components import (
    LORA_DOWN_PREFIX,
    LORA_SCALES_INPUT,
    LORA_SLOTS_INPUT,
    LORA_UP_PREFIX,
    ComponentSpec,
    LoraInputs,
)
from kiln_server.lora.graph import lora_layer_specs
from kiln_server.lora.layers import RowLoraLayers


def lora_input_names(lora: LoraInputs) -> frozenset[str]:
    """Names of every LoRA graph input of `lora`."""
    return frozenset(t.name for t in lora.tensors())


class GraphLoraFeed:
    """The LoRA inputs of one compiled UNet, read from the per-row layers an adapter stack
    fills (`layers`, whose slot tensors live on `device`)."""

    def __init__(self, lora: LoraInputs, layers: RowLoraLayers, device: torch.device) -> None:
        """Raises EngineError when `layers` are not the layers the graph was built for."""
        if lora_layer_specs(layers) != lora.layers:
            raise EngineError(
                "the UNet graph's LoRA inputs were built for other layers than this model's "
                "UNet has; rebuild the engines with `kiln build-engines`"
            )
        self.lora = lora
        self.layers = layers
        self.device = device
        largest = max(
            (
                (lora.slots + 1) * lora.max_rank * max(math.prod(layer.down), layer.out)
                for layer in lora.layers
            ),
            default=0,
        )
        # Read-only for every graph: the stacks of layers no adapter has targeted yet.
        self._zeros = torch.zeros(largest, dtype=torch.float32, device=device)

    def rows(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([rows, k] slots, [rows, k] scales) of the current assignment; rows without a
        LoRA are slot 0 at scale 0. EngineError when the assignment is for another batch
        or a row applies more LoRAs than the graph takes."""
        k = self.lora.max_loras
        # Made where the graph runs, from the assignment's tensors there: no host sync.
        slots = torch.zeros((rows, k), dtype=torch.int64, device=self.device)
        scales = torch.zeros((rows, k), dtype=torch.float32, device=self.device)
        assignment = self.layers.assignment
        if assignment is not None and assignment.any_active:
            if assignment.rows != rows:
                raise EngineError(
                    f"the LoRA row assignment is for {assignment.rows} rows but the UNet "
                    f"call has {rows}"
                )
            used = assignment.slots.shape[1]
            if used > k:
                raise EngineError(
                    f"a row applies {used} LoRAs but the UNet graph was built for at most {k} "
                    "per request (max_loras_per_request); rebuild the engines with "
                    f"`kiln build-engines ... --max-loras-per-request {used}`"
                )
            active = assignment.active.to(self.device)
            slots[active, :used] = assignment.slots.to(self.device)
            scales[active, :used] = assignment.scales.to(self.device, torch.float32)
        return slots, scales

    def stacks(self) -> dict[str, torch.Tensor]:
        """Every layer's down and up stack: the adapter stack's own tensors, or views of the
        shared zero buffer for layers whose slots are not allocated."""
        stacked, rank = self.lora.slots + 1, self.lora.max_rank
        out: dict[str, torch.Tensor] = {}
        for spec in self.lora.layers:
            layer = self.layers[spec.name]
            shapes = {
                LORA_DOWN_PREFIX + spec.name: ((stacked, rank, *spec.down), layer.down),
                LORA_UP_PREFIX + spec.name: ((stacked, spec.out, rank), layer.up),
            }
            for name, (shape, tensor) in shapes.items():
                if tensor is None:
                    tensor = self._zeros[: math.prod(shape)].view(shape)
                elif tuple(tensor.shape) != shape or tensor.dtype != torch.float32:
                    raise EngineError(
                        f"the adapter stack holds {name} as {tuple(tensor.shape)} "
                        f"{tensor.dtype}, the UNet graph takes {shape} float32: the server's "
                        "lora_slots or max_lora_rank differ from the engines'"
                    )
                out[name] = tensor
        return out

    def inputs(self, rows: int) -> dict[str, torch.Tensor]:
        """Every LoRA input of one UNet call of `rows` rows."""
        slots, scales = self.rows(rows)
        return {LORA_SLOTS_INPUT: slots, LORA_SCALES_INPUT: scales, **self.stacks()}


@dataclass
class CompiledLora:
    """How a compiled (onnxruntime, TensorRT) UNet engine takes LoRAs.

    `rebuild` is the `kiln build-engines` command that rebuilds its engines, without LoRA
    flags (messages add the server's); `feed` supplies the LoRA inputs of a graph built
    with them (None: the graph has none); `unet_config` is the UNet's diffusers config
    (reading kohya files needs it). `refusal` is set when the model has LoRA folders that
    these engines cannot serve: the message a request with `loras` gets.
    """

    backend: str
    rebuild: str
    feed: GraphLoraFeed | None
    unet_config: Any = None
    refusal: str | None = None


def with_lora_inputs(
    spec: ComponentSpec, inputs: Mapping[str, torch.Tensor], feed: GraphLoraFeed | None
) -> dict[str, torch.Tensor]:
    """`inputs` completed with the feed's LoRA inputs when the caller gave none of them.

    A caller that gives every LoRA input (a test, the export's validation) is taken as is.
    A UNet with LoRA inputs always has a feed (with no adapter stack on it, every row is
    the base model's). EngineError when only some LoRA inputs are given, or no feed.
    """
    if spec.lora is None:
        return dict(inputs)
    names = lora_input_names(spec.lora)
    given = names & set(inputs)
    if given == names:
        return dict(inputs)
    if given:
        missing = sorted(names - given)
        raise EngineError(
            f"{spec.name}: give every LoRA input or none (missing {missing[:3]}"
            f"{' …' if len(missing) > 3 else ''})"
        )
    sample = inputs.get("sample")
    if sample is None:
        raise EngineError(f"{spec.name}: missing input 'sample'")
    if feed is None:
        raise EngineError(f"{spec.name} takes per-row LoRA inputs and no adapter stack feeds them")
    return {**inputs, **feed.inputs(int(sample.shape[0]))}
