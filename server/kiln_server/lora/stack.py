"""The adapters resident for one model: slots in the per-row layers, with an LRU.

An `AdapterStack` owns the slot tensors of a UNet's per-row LoRA layers (see `layers`):
`capacity` adapter slots plus slot 0, which stays all zero and means "no LoRA", every slot
padded with zeros to `max_rank`. Loading an adapter that is not resident takes a free slot
or evicts the least recently used adapter that the running batch does not use, zeroes the
whole slot in every layer and writes the adapter's weights (its up already multiplied by
alpha / r), so a reused slot keeps nothing of its former adapter. A layer's slot tensors are
allocated the first time any adapter targets it and never freed; memory is therefore
bounded by capacity x max_rank x the layers adapters target, whatever the number of
distinct LoRAs served over time.

Not thread-safe: the engine thread owns the stack (loading files from disk belongs on
another thread, which then hands `LoraWeights` to the engine thread).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Sequence

import torch

from kiln_server.lora.errors import LoraRefused, StackFull
from kiln_server.lora.layers import RowAssignment, RowLoraConv2d, RowLoraLayers
from kiln_server.lora.weights import LoraModule, LoraWeights
from kiln_server.pipeline.params import LoraUse


class AdapterStack:
    """Resident adapters of one UNet, in `capacity` slots of rank `max_rank`."""

    def __init__(self, layers: RowLoraLayers, *, capacity: int, max_rank: int) -> None:
        if capacity < 1 or max_rank < 1:
            raise ValueError("an adapter stack needs at least one slot and rank 1")
        self.layers = layers
        self.capacity = capacity
        self.max_rank = max_rank
        self._lru: OrderedDict[str, int] = OrderedDict()
        self._free = list(range(capacity, 0, -1))
        self._in_use: frozenset[str] = frozenset()
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

    def memory_bytes(self) -> int:
        """Bytes of every slot tensor allocated so far."""
        total = 0
        for name in self.layers:
            layer = self.layers[name]
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
        for module_name, module in weights.unet.items():
            if module_name not in self.layers:
                raise LoraRefused(
                    weights.name, f"it targets '{module_name[:120]}', which this model lacks"
                )
            layer = self.layers[module_name]
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
                    weights.name,
                    f"its weights for '{module_name[:120]}' do not match the model's layer shape",
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
        self._write(slot, weights.unet)
        self._lru[weights.name] = slot
        self.loads += 1
        return slot

    def evict(self, name: str) -> None:
        """Drop a resident adapter (its slot is zeroed and freed); unknown names are ignored."""
        slot = self._lru.pop(name, None)
        if slot is None:
            return
        self._write(slot, {})
        self._free.append(slot)

    def _allocate(self, name: str) -> None:
        """Give layer `name` its zero slot tensors (slots x max_rank)."""
        layer = self.layers[name]
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

    def _write(self, slot: int, modules: dict[str, LoraModule]) -> None:
        """Zero `slot` in every layer, then write `modules` into it."""
        for name in self.layers:
            layer = self.layers[name]
            if layer.down is not None and layer.up is not None and slot in layer.filled:
                layer.down[slot].zero_()
                layer.up[slot].zero_()
                layer.filled.discard(slot)
        with torch.no_grad():
            for name, module in modules.items():
                layer = self.layers[name]
                if layer.down is None:
                    self._allocate(name)
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

    def _device(self) -> torch.device:
        """The device of the wrapped layers."""
        for name in self.layers:
            return self.layers[name].base.weight.device
        return torch.device("cpu")
