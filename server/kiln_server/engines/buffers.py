"""Buffer planning shared by the compiled runtimes (onnxruntime, TensorRT).

Everything here is pure: from a component declaration and the shapes of one call it works
out the call's `ShapeRequest`, the shape and size of every buffer, and which optimization
profile of an engine can run it. The runtimes then allocate one set of buffers per shape
and reuse it (`BufferCache`), so a steady stream of same-sized requests allocates nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from kiln_server.engines.base import EngineError
from kiln_server.engines.components import ComponentSpec, ShapeRange, ShapeRequest

Shape = tuple[int, ...]
# (min, opt, max) shape of every input of one optimization profile.
ProfileShapes = Mapping[str, tuple[Shape, Shape, Shape]]

T = TypeVar("T")


@dataclass(frozen=True)
class BufferSpec:
    """One tensor's buffer for one call: name, numpy dtype, concrete shape, input or not."""

    name: str
    dtype: str
    shape: Shape
    is_input: bool

    @property
    def nbytes(self) -> int:
        """Size of the buffer in bytes."""
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class BufferPlan:
    """Every buffer one call of a component needs, in declared order (inputs first)."""

    component: str
    request: ShapeRequest
    buffers: tuple[BufferSpec, ...]

    @property
    def inputs(self) -> tuple[BufferSpec, ...]:
        """The input buffers."""
        return tuple(b for b in self.buffers if b.is_input)

    @property
    def outputs(self) -> tuple[BufferSpec, ...]:
        """The output buffers."""
        return tuple(b for b in self.buffers if not b.is_input)

    @property
    def total_bytes(self) -> int:
        """Bytes of all buffers together."""
        return sum(b.nbytes for b in self.buffers)


def request_from_shapes(spec: ComponentSpec, shapes: Mapping[str, Sequence[int]]) -> ShapeRequest:
    """Solve the declaration's symbolic dims from the shapes of a call's inputs.

    Returns the call's ShapeRequest (height and width are 0 for components whose shapes do
    not depend on the image size). Raises EngineError naming the tensor and dimension when
    a shape has the wrong rank, a static dim differs from the declaration, or two tensors
    disagree on a symbolic dim.
    """
    values: dict[str, int] = {}
    for tensor in spec.inputs:
        if tensor.name not in shapes:
            raise EngineError(f"{spec.name}: missing input {tensor.name!r}")
        shape = tuple(int(d) for d in shapes[tensor.name])
        if len(shape) != len(tensor.dims):
            raise EngineError(
                f"{spec.name}: input {tensor.name!r} has shape {shape}, "
                f"expected {len(tensor.dims)} dims {tensor.dims}"
            )
        for axis, (dim, size) in enumerate(zip(tensor.dims, shape, strict=True)):
            if isinstance(dim, int):
                if dim != size:
                    raise EngineError(
                        f"{spec.name}: input {tensor.name!r} has size {size} on axis {axis}, "
                        f"the declaration fixes it at {dim}"
                    )
            elif values.setdefault(dim, size) != size:
                raise EngineError(
                    f"{spec.name}: input {tensor.name!r} has {dim}={size} on axis {axis} but "
                    f"another input has {dim}={values[dim]}"
                )
    if "batch" not in values:
        raise EngineError(f"{spec.name}: no input carries the batch dimension")
    request = spec.request_for(values["batch"], values)
    # Latent and image sizes must agree when a component declares both.
    resolved = spec.dim_values(request)
    for name, size in values.items():
        if resolved[name] != size:
            raise EngineError(
                f"{spec.name}: {name}={size} does not match the image size "
                f"{request.height}x{request.width} (scale factor {spec.dims.vae_scale_factor})"
            )
    return request


def plan_buffers(spec: ComponentSpec, request: ShapeRequest) -> BufferPlan:
    """The buffers of every declared input and output for one call of `request`'s size."""
    buffers = tuple(
        BufferSpec(t.name, t.dtype, spec.shape(t.name, request), is_input=t in spec.inputs)
        for t in spec.tensors
    )
    return BufferPlan(component=spec.name, request=request, buffers=buffers)


def shape_in_profile(shape: Shape, bounds: tuple[Shape, Shape, Shape]) -> bool:
    """Whether `shape` lies between a profile's min and max shapes, axis by axis."""
    low, _, high = bounds
    if not (len(shape) == len(low) == len(high)):
        return False
    return all(lo <= s <= hi for s, lo, hi in zip(shape, low, high, strict=True))


def profile_is_static(profile: ProfileShapes) -> bool:
    """Whether every input of the profile has min == opt == max (CUDA graphs allowed)."""
    return all(low == opt == high for low, opt, high in profile.values())


def select_profile(profiles: Sequence[ProfileShapes], shapes: Mapping[str, Shape]) -> int | None:
    """Index of the profile to run `shapes` with, or None when no profile admits them.

    A static profile that matches exactly wins (it can replay a CUDA graph); otherwise the
    first profile whose ranges contain every input shape.
    """
    admitting = [
        index
        for index, profile in enumerate(profiles)
        if all(
            name in shapes and shape_in_profile(tuple(shapes[name]), bounds)
            for name, bounds in profile.items()
        )
    ]
    for index in admitting:
        if profile_is_static(profiles[index]):
            return index
    return admitting[0] if admitting else None


def describe_ranges(ranges: Sequence[ShapeRange]) -> str:
    """Human-readable list of what a component's profiles accept, for error messages."""

    def one(r: ShapeRange) -> str:
        batch = f"{r.min.batch}" if r.min.batch == r.max.batch else f"{r.min.batch}-{r.max.batch}"
        if not r.max.height:
            return f"batch {batch}"
        sizes = {(r.min.height, r.min.width), (r.max.height, r.max.width)}
        if len(sizes) == 1:
            size = f"{r.min.width}x{r.min.height}"
        else:
            size = f"{r.min.width}x{r.min.height} to {r.max.width}x{r.max.height}"
        return f"batch {batch} at {size}"

    return "; ".join(one(r) for r in ranges) or "nothing"


class BufferCache(Generic[T]):
    """Per-shape buffers, allocated once and reused: the newest `capacity` shapes are kept.

    `get(request, allocate)` returns the cached value for `request`, calling `allocate`
    only on a miss; the least recently used entry is dropped when the cache is full.
    """

    def __init__(self, capacity: int = 4) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._entries: OrderedDict[ShapeRequest, T] = OrderedDict()

    def get(self, request: ShapeRequest, allocate: Callable[[ShapeRequest], T]) -> T:
        """The buffers for `request`, allocated on first use."""
        if request in self._entries:
            self._entries.move_to_end(request)
            return self._entries[request]
        value = allocate(request)
        self._entries[request] = value
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request: object) -> bool:
        return request in self._entries

    def clear(self) -> None:
        """Drop every cached buffer set."""
        self._entries.clear()
