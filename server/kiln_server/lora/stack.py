"""The adapters resident for one model: slots in the per-row layers, with an LRU.

An `AdapterStack` owns the slot tensors of a model's per-row LoRA layers (see `layers`):
the UNet's and, where the backend applies them, each text encoder's. It has `capacity`
adapter slots plus slot 0, which stays all zero and means "no LoRA", every slot padded with
zeros to `max_rank`. One LoRA file is one adapter with one slot number, used in the UNet's
layers and in the text encoders' alike, so its text-encoder part is resident exactly when
its UNet part is. Loading an adapter that is not resident takes a free slot or evicts the
least recently used adapter that the running batch does not use, zeroes the whole slot in
every layer of every component and writes the adapter's weights (its up already
multiplied by alpha / r), so a reused slot keeps nothing of its former adapter. A layer's
slot tensors are allocated the first time any adapter targets it and never freed; memory
is therefore bounded by capacity x max_rank x the layers adapters target, whatever the
number of distinct LoRAs served over time.

A stack without text-encoder layers (the compiled backends, whose text-encoder graphs take
no LoRA inputs) refuses a file with text-encoder weights, naming the encoder, rather than
applying its UNet part alone.

Not thread-safe: the engine thread owns the stack (loading files from disk belongs on
another thread, which then hands `LoraWeights` to the engine thread).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kiln_server.lora.errors import LoraRefused, StackFull
from kiln_server.lora.layers import (
    RowAssignment,
    RowLoraConv2d,
    RowLoraLayers,
    RowLoraLinear,
)
from kiln_server.lora.weights import LoraModule, LoraWeights
from kiln_server.pipeline.params import LoraUse

UNET = "unet"


def text_encoder_refusal(encoder: str) -> str:
    """Why a file with `encoder` weights is refused by a stack without that encoder's
    layers: serving its UNet part alone would differ from diffusers without saying so."""
    return (
        f"it has {encoder} (text-encoder) weights, which this model's engines do not apply "
        "(text-encoder LoRAs are applied on the torch backend); use a UNet-only LoRA or "
        "serve this model on the torch backend"
    )


@dataclass(frozen=True)
class TextEncoderLoras:
    """The text-encoder part of one request's LoRAs, resident in `stack`.

    `key` identifies the embeddings it gives: (name, load number, scale) per LoRA with
    text-encoder weights, so equal keys mean equal embeddings and a file read again after
    an eviction gets a new key. `applied()` sets them on every text encoder's layers for
    the calls made inside it (engine thread), one row per call.
    """

    stack: AdapterStack
    uses: tuple[LoraUse, ...]
    key: tuple[tuple[str, int, float], ...]

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within: text-encoder calls of one row apply these LoRAs; after: none."""
        self.stack.assign_text_encoders([self.uses])
        try:
            yield
        finally:
            self.stack.clear_text_encoders()


class AdapterStack:
    """Resident adapters of one model, in `capacity` slots of rank `max_rank`: the UNet's
    per-row `layers` and, optionally, each text encoder's (`text_encoders`, keyed
    `text_encoder` / `text_encoder_2` as `LoraWeights.text_encoders`)."""

    def __init__(
        self,
        layers: RowLoraLayers,
        *,
        capacity: int,
        max_rank: int,
        text_encoders: Mapping[str, RowLoraLayers] | None = None,
    ) -> None:
        if capacity < 1 or max_rank < 1:
            raise ValueError("an adapter stack needs at least one slot and rank 1")
        self.layers = layers
        self.text_encoders = dict(text_encoders or {})
        self.capacity = capacity
        self.max_rank = max_rank
        self._lru: OrderedDict[str, int] = OrderedDict()
        self._free = list(range(capacity, 0, -1))
        self._in_use: frozenset[str] = frozenset()
        # Resident adapters with text-encoder weights: the encoders they target and the
        # load number that tells this residency from an earlier one of the same name.
        self._encoders_of: dict[str, tuple[frozenset[str], int]] = {}
        self.loads = 0
        """Adapters written into a slot so far (kiln_lora_loads_total)."""

    @property
    def resident(self) -> list[str]:
        """Names of the resident adapters, least recently used first."""
        return list(self._lru)

    def slot_of(self, name: str) -> int | None:
        """The slot of a resident adapter (marking it used), or None."""
        slot = self._lru.get(name)
        if slot is not None:
            self._lru.move_to_end(name)
        return slot

    def _components(self) -> list[tuple[str, RowLoraLayers]]:
        """Every component's per-row layers: the UNet's, then each text encoder's."""
        return [(UNET, self.layers), *self.text_encoders.items()]

    def _all_layers(self) -> Iterator[RowLoraLinear | RowLoraConv2d]:
        for _, layers in self._components():
            for name in layers:
                yield layers[name]

    def memory_bytes(self) -> int:
        """Bytes of every slot tensor allocated so far, text encoders' included."""
        total = 0
        for layer in self._all_layers():
            for tensor in (layer.down, layer.up):
                if tensor is not None:
                    total += tensor.numel() * tensor.element_size()
        return total

    def check(self, weights: LoraWeights) -> None:
        """Refuse (`LoraRefused`) an adapter that does not fit this model and stack."""
        if weights.rank > self.max_rank:
            raise LoraRefused(
                weights.name,
                f"its rank {weights.rank} is above the maximum LoRA rank {self.max_rank}",
            )
        for encoder in weights.text_encoders:
            if encoder not in self.text_encoders:
                raise LoraRefused(weights.name, text_encoder_refusal(encoder))
        self._check_modules(weights.name, UNET, self.layers, weights.unet)
        for encoder, modules in weights.text_encoders.items():
            self._check_modules(weights.name, encoder, self.text_encoders[encoder], modules)

    @staticmethod
    def _check_modules(
        name: str, component: str, layers: RowLoraLayers, modules: Mapping[str, LoraModule]
    ) -> None:
        """Refuse modules `layers` lack or whose shapes differ from their layer's."""
        where = "" if component == UNET else f"{component} "
        for module_name, module in modules.items():
            if module_name not in layers:
                raise LoraRefused(
                    name, f"it targets {where}'{module_name[:120]}', which this model lacks"
                )
            layer = layers[module_name]
            conv = isinstance(layer, RowLoraConv2d)
            if isinstance(layer, RowLoraConv2d):
                expected_down = (layer.base.in_channels, *layer.base.kernel_size)
                out = layer.base.out_channels
            else:
                expected_down = (layer.base.in_features,)
                out = layer.base.out_features
            if (
                module.is_conv != conv
                or tuple(module.down.shape[1:]) != tuple(expected_down)
                or (module.up.shape[0] != out)
            ):
                raise LoraRefused(
                    name,
                    f"its weights for {where}'{module_name[:120]}' do not match the model's "
                    "layer shape",
                )

    def load(self, weights: LoraWeights, in_use: Collection[str] = ()) -> int:
        """Make `weights` resident and return its slot.

        An adapter of the same name already resident is only marked used. Otherwise a free
        slot is taken, or the least recently used adapter not in `in_use` and not used by
        the current row assignment is evicted. Raises `StackFull` when every slot is
        pinned, `LoraRefused` when the adapter does not fit (nothing is evicted then).
        """
        slot = self.slot_of(weights.name)
        if slot is not None:
            return slot
        self.check(weights)
        if self._free:
            slot = self._free.pop()
        else:
            pinned = set(in_use) | self._in_use
            victim = next((name for name in self._lru if name not in pinned), None)
            if victim is None:
                raise StackFull(
                    weights.name,
                    f"all {self.capacity} LoRA slots hold LoRAs the running batch uses",
                )
            slot = self._lru.pop(victim)
            self._encoders_of.pop(victim, None)
        self._write(slot, weights)
        self._lru[weights.name] = slot
        self.loads += 1
        if weights.text_encoders:
            self._encoders_of[weights.name] = (frozenset(weights.text_encoders), self.loads)
        return slot

    def evict(self, name: str) -> None:
        """Drop a resident adapter (its slot is zeroed and freed); unknown names are ignored."""
        slot = self._lru.pop(name, None)
        if slot is None:
            return
        self._encoders_of.pop(name, None)
        self._write(slot, None)
        self._free.append(slot)

    def _allocate(self, layer: RowLoraLinear | RowLoraConv2d) -> None:
        """Give `layer` its zero slot tensors (slots x max_rank)."""
        weight = layer.base.weight
        slots = self.capacity + 1
        if isinstance(layer, RowLoraConv2d):
            base = layer.base
            down_shape = (slots, self.max_rank, base.in_channels, *base.kernel_size)
            up_shape = (slots, base.out_channels, self.max_rank)
        else:
            down_shape = (slots, self.max_rank, layer.base.in_features)
            up_shape = (slots, layer.base.out_features, self.max_rank)
        layer.down = torch.zeros(down_shape, dtype=weight.dtype, device=weight.device)
        layer.up = torch.zeros(up_shape, dtype=weight.dtype, device=weight.device)

    def _write(self, slot: int, weights: LoraWeights | None) -> None:
        """Zero `slot` in every layer of every component, then write `weights` into it."""
        for layer in self._all_layers():
            if layer.down is not None and layer.up is not None and slot in layer.filled:
                layer.down[slot].zero_()
                layer.up[slot].zero_()
                layer.filled.discard(slot)
        if weights is None:
            return
        parts = [(self.layers, weights.unet)]
        parts += [(self.text_encoders[e], m) for e, m in weights.text_encoders.items()]
        with torch.no_grad():
            for layers, modules in parts:
                for name, module in modules.items():
                    layer = layers[name]
                    if layer.down is None:
                        self._allocate(layer)
                    assert layer.down is not None and layer.up is not None
                    r = module.rank
                    layer.down[slot, :r].copy_(module.down)
                    layer.up[slot, :, :r].copy_(module.up * module.scale)
                    layer.filled.add(slot)

    def assign(self, rows: Sequence[Sequence[LoraUse]]) -> RowAssignment:
        """Set the next UNet calls' per-row adapters: for each row, the LoRAs it applies.

        Every named adapter must be resident (`KeyError` otherwise); uses at scale 0 are
        dropped, so such rows are the base model's. The named adapters count as in use
        (not evictable) until the next `assign` or `clear`.
        """
        device = self._device()
        per_row = []
        names: set[str] = set()
        for uses in rows:
            pairs = []
            for use in uses:
                slot = self.slot_of(use.name)
                if slot is None:
                    raise KeyError(f"LoRA {use.name!r} is not resident")
                names.add(use.name)
                pairs.append((slot, float(use.scale)))
            per_row.append(pairs)
        assignment = RowAssignment.build(per_row, device)
        self._in_use = frozenset(names)
        self.layers.assign(assignment)
        return assignment

    def clear(self) -> None:
        """No adapter applies to the next calls, and none is in use."""
        self._in_use = frozenset()
        self.layers.assign(None)

    def text_encoder_loras(self, uses: Sequence[LoraUse]) -> TextEncoderLoras | None:
        """The text-encoder part of one request's resident LoRAs, or None when none of them
        (at a scale other than 0) has text-encoder weights: the prompts are then the base
        model's. `KeyError` for an adapter that is not resident."""
        kept = []
        key = []
        for use in uses:
            if self.slot_of(use.name) is None:
                raise KeyError(f"LoRA {use.name!r} is not resident")
            targets = self._encoders_of.get(use.name)
            if targets is not None and use.scale != 0.0:
                kept.append(use)
                key.append((use.name, targets[1], float(use.scale)))
        if not kept:
            return None
        return TextEncoderLoras(self, tuple(kept), tuple(key))

    def assign_text_encoders(self, rows: Sequence[Sequence[LoraUse]]) -> None:
        """Set each text encoder's per-row adapters for the next calls, as `assign` does
        for the UNet; each encoder's rows keep only the LoRAs with weights for it."""
        for encoder, layers in self.text_encoders.items():
            per_row = []
            for uses in rows:
                pairs = []
                for use in uses:
                    slot = self.slot_of(use.name)
                    if slot is None:
                        raise KeyError(f"LoRA {use.name!r} is not resident")
                    targets = self._encoders_of.get(use.name)
                    if targets is not None and encoder in targets[0]:
                        pairs.append((slot, float(use.scale)))
                per_row.append(pairs)
            layers.assign(RowAssignment.build(per_row, self._device()))

    def clear_text_encoders(self) -> None:
        """No adapter applies to the text encoders' next calls."""
        for layers in self.text_encoders.values():
            layers.assign(None)

    def _device(self) -> torch.device:
        """The device of the wrapped layers."""
        for name in self.layers:
            return self.layers[name].base.weight.device
        return torch.device("cpu")
