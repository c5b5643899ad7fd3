"""Per-row LoRA layers: requests with different LoRAs share one UNet call.

The same layers are installed on the text encoders (each model has its own assignment), so
a text-encoder call applies each row's LoRAs as a UNet call does.

Contract. `install_row_lora(unet)` replaces every plain `nn.Linear` and `nn.Conv2d` of the
UNet with a wrapper that holds the original layer unchanged (as `.base`) and, once an
adapter stack gives it one, a stack of LoRA slots: `down` [slots, R, in(, kh, kw)] and
`up` [slots, out, R], zero-padded to the stack's maximum rank R, slot 0 all zero ("no
LoRA"), each slot's up already multiplied by its module's alpha / r. Before each UNet call
the batch's `RowAssignment` is set (`RowLoraLayers.assign`): for every row of the batch
(rows of one request share it; under classifier-free guidance a request has 2 rows) up to
k (slot, scale) pairs. Each wrapped layer then computes

    y = base(x);   y[row] += sum_j scale[row, j] * up[slot[row, j]] @ (down[slot[row, j]] @ x[row])

- The base layer runs once for the whole batch, exactly as without the wrapper.
- Rows with no (slot, scale != 0) pair are not touched at all: their output is the base
  layer's, bit for bit, so a request at scale 0 or with no LoRA gets the base model's bytes.
  The delta is added with `index_add` on the active rows only (adding an exact zero would
  still turn -0.0 into +0.0); when every row is active, it is a plain add.
- Linear: the active rows' slots are gathered and their ranks concatenated
  ([n, k*R, in] and [n, out, k*R], the row scale folded into `up`), then two batched
  matmuls. Cost per layer: the gather of n*k*R*(in+out) weights plus 2*n*T*k*R*(in+out)
  flops, against the base layer's n*T*in*out; with R much smaller than in and out this is
  a few percent, and zero-padded ranks cost as much as real ones.
- Conv2d (kohya LoCon files): the down is a kh x kw conv to R channels with the base
  layer's stride and padding, the up a 1x1 conv. Rows are grouped by slot (one pair of
  convs per distinct slot in the batch), so the cost grows with the number of distinct
  LoRAs, not rows.

Trade-offs. Every eligible layer is wrapped at install, so the model's parameter names gain
a `.base` (load weights before installing); a layer no resident adapter targets costs one
attribute check per call. Conv layers with groups, dilation or a padding mode other than
zeros are left unwrapped (no SDXL LoRA targets them). The assignment holds host-side
grouping for the conv path, so it is built once per step on the host, not captured in a
graph; the ONNX / TensorRT backends need their own formulation with the stacks and
per-row indices as graph inputs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class RowAssignment:
    """Which adapter slots, at which scales, each row of one UNet call uses.

    `rows` is the batch size. `active` holds the indices of rows with at least one
    (slot != 0, scale != 0) pair, `slots` and `scales` their pairs ([len(active), k]; unused
    pairs are slot 0 at scale 0). `used_slots` is the set of slots they use. `groups`
    lists, per distinct slot, the positions among the active rows that use it and their
    scales, for the conv path. With no active row every layer returns its base output.
    """

    rows: int
    active: torch.Tensor
    slots: torch.Tensor
    scales: torch.Tensor
    groups: tuple[tuple[int, torch.Tensor, torch.Tensor], ...]
    used_slots: frozenset[int]

    @property
    def any_active(self) -> bool:
        """Whether any row adds a LoRA delta."""
        return bool(self.groups)

    @classmethod
    def build(
        cls,
        per_row: Sequence[Sequence[tuple[int, float]]],
        device: torch.device | str = "cpu",
    ) -> RowAssignment:
        """The assignment for rows given as lists of (slot, scale) pairs.

        Pairs with slot 0 or scale 0 are dropped, so such rows are inactive.
        """
        kept = [[(s, c) for s, c in row if s != 0 and c != 0.0] for row in per_row]
        active = [i for i, pairs in enumerate(kept) if pairs]
        k = max((len(kept[i]) for i in active), default=0)
        slots = [[s for s, _ in kept[i]] + [0] * (k - len(kept[i])) for i in active]
        scales = [[c for _, c in kept[i]] + [0.0] * (k - len(kept[i])) for i in active]
        by_slot: dict[int, tuple[list[int], list[float]]] = {}
        for position, i in enumerate(active):
            for s, c in kept[i]:
                members, factors = by_slot.setdefault(s, ([], []))
                members.append(position)
                factors.append(c)
        groups = tuple(
            (
                s,
                torch.tensor(members, dtype=torch.long, device=device),
                torch.tensor(factors, dtype=torch.float32, device=device),
            )
            for s, (members, factors) in sorted(by_slot.items())
        )
        return cls(
            rows=len(per_row),
            active=torch.tensor(active, dtype=torch.long, device=device),
            slots=torch.tensor(slots, dtype=torch.long, device=device).reshape(len(active), k),
            scales=torch.tensor(scales, dtype=torch.float32, device=device).reshape(len(active), k),
            groups=groups,
            used_slots=frozenset(by_slot),
        )

    @classmethod
    def none(cls, rows: int, device: torch.device | str = "cpu") -> RowAssignment:
        """An assignment under which every row is the base model."""
        return cls.build([[] for _ in range(rows)], device)


class _Shared:
    """The assignment every wrapper of one UNet reads; set once per UNet call."""

    def __init__(self) -> None:
        self.assignment: RowAssignment | None = None


class _RowLoraLayer(nn.Module):
    """Common part of the wrappers: the base layer and this layer's slot stacks."""

    def __init__(self, base: nn.Module, shared: _Shared) -> None:
        super().__init__()
        self.base = base
        self._shared = shared
        self.down: torch.Tensor | None = None
        self.up: torch.Tensor | None = None
        # Slots whose adapter targets this layer (host side, kept by the adapter stack).
        self.filled: set[int] = set()

    def _assignment(self, x: torch.Tensor) -> RowAssignment | None:
        """The current assignment when this layer has something to add, else None."""
        assignment = self._shared.assignment
        if assignment is None or self.down is None or not assignment.any_active:
            return None
        if self.filled.isdisjoint(assignment.used_slots):
            return None
        if x.shape[0] != assignment.rows:
            raise ValueError(
                f"the LoRA row assignment is for {assignment.rows} rows but the layer "
                f"got a batch of {x.shape[0]}"
            )
        return assignment

    def _delta(self, xs: torch.Tensor, assignment: RowAssignment) -> torch.Tensor | None:
        """The LoRA output of the active rows `xs` (None: nothing to add)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output, plus each active row's LoRA delta."""
        out: torch.Tensor = self.base(x)
        assignment = self._assignment(x)
        if assignment is None:
            return out
        every_row = len(assignment.active) == assignment.rows
        xs = x if every_row else x.index_select(0, assignment.active)
        delta = self._delta(xs, assignment)
        if delta is None:
            return out
        return out + delta if every_row else out.index_add(0, assignment.active, delta)


class RowLoraLinear(_RowLoraLayer):
    """An `nn.Linear` plus per-row LoRA deltas; see the module docstring for the contract."""

    base: nn.Linear

    def _delta(self, xs: torch.Tensor, assignment: RowAssignment) -> torch.Tensor | None:
        assert self.down is not None and self.up is not None
        n, k = assignment.slots.shape
        rank = self.down.shape[1]
        flat = xs.reshape(n, -1, xs.shape[-1])
        down = self.down.index_select(0, assignment.slots.reshape(-1))
        down = down.reshape(n, k * rank, -1)
        up = self.up.index_select(0, assignment.slots.reshape(-1)).reshape(n, k, -1, rank)
        up = up * assignment.scales.to(up.dtype)[:, :, None, None]
        up = up.permute(0, 2, 1, 3).reshape(n, -1, k * rank)
        delta = torch.bmm(torch.bmm(flat, down.transpose(1, 2)), up.transpose(1, 2))
        return delta.reshape(*xs.shape[:-1], -1)


class RowLoraConv2d(_RowLoraLayer):
    """An `nn.Conv2d` plus per-row LoRA deltas (kxk down conv, 1x1 up conv), by slot group."""

    base: nn.Conv2d

    def _delta(self, xs: torch.Tensor, assignment: RowAssignment) -> torch.Tensor | None:
        assert self.down is not None and self.up is not None
        delta: torch.Tensor | None = None
        for slot, members, factors in assignment.groups:
            if slot not in self.filled:
                continue
            h = F.conv2d(
                xs.index_select(0, members),
                self.down[slot],
                None,
                self.base.stride,
                self.base.padding,
            )
            part = F.conv2d(h, self.up[slot][:, :, None, None])
            part = part * factors.to(part.dtype)[:, None, None, None]
            if delta is None:
                delta = part.new_zeros((xs.shape[0], *part.shape[1:]))
            delta = delta.index_add(0, members, part)
        return delta


def _eligible_conv(module: nn.Conv2d) -> bool:
    """Whether a conv has the plain form a LoRA down/up pair can follow."""
    return (
        module.groups == 1 and tuple(module.dilation) == (1, 1) and module.padding_mode == "zeros"
    )


class RowLoraLayers:
    """The per-row LoRA layers installed on one UNet, by the base layers' module names."""

    def __init__(self, layers: dict[str, _RowLoraLayer], shared: _Shared) -> None:
        self._layers = layers
        self._shared = shared

    def __contains__(self, name: object) -> bool:
        return name in self._layers

    def __getitem__(self, name: str) -> RowLoraLinear | RowLoraConv2d:
        layer = self._layers[name]
        assert isinstance(layer, RowLoraLinear | RowLoraConv2d)
        return layer

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def assign(self, assignment: RowAssignment | None) -> None:
        """Set the rows' adapters for the following UNet calls (None: every row is base)."""
        self._shared.assignment = assignment

    @property
    def assignment(self) -> RowAssignment | None:
        """The assignment the layers currently apply."""
        return self._shared.assignment


def install_row_lora(model: nn.Module, *, drop_prefix: str = "") -> RowLoraLayers:
    """Wrap every plain Linear and Conv2d of `model` in place; returns the wrappers by name.

    Names are the base layers' names in `model` before wrapping (diffusers' module names,
    as LoRA files use them), with `drop_prefix` removed from their start where present.
    Installing twice is an error.
    """
    shared = _Shared()
    layers: dict[str, _RowLoraLayer] = {}
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear or (type(module) is nn.Conv2d and _eligible_conv(module))
    ]
    if any(isinstance(module, _RowLoraLayer) for module in model.modules()):
        raise ValueError("per-row LoRA layers are already installed on this model")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper: _RowLoraLayer = (
            RowLoraLinear(module, shared)
            if isinstance(module, nn.Linear)
            else RowLoraConv2d(module, shared)
        )
        setattr(parent, child, wrapper)
        layers[name.removeprefix(drop_prefix) if drop_prefix else name] = wrapper
    return RowLoraLayers(layers, shared)
