"""The TensorRT backend: serialized TensorRT 10 engines, resident on the GPU.

All engines of a model share one `TensorRTRuntime`: one `trt.Runtime`, one CUDA stream
that every call is enqueued on, and one block of device scratch memory that every
execution context uses (contexts created with the USER_MANAGED allocation strategy), which
is safe because calls are serialized on that stream. Each call:

1. solves the call's sizes from the inputs and picks the engine profile that admits them
   (an exact static profile first);
2. copies the inputs into input buffers preallocated for that shape (reused across calls)
   and, when the shape differs from the last call's, binds the profile, the input shapes
   and every tensor address (`set_tensor_address`);
3. runs `execute_async_v3` on the stream; for a static profile, the second run after a
   binding is captured into a CUDA graph that later calls replay. The first run after
   every binding is always a plain one: TensorRT defers work after a shape change to
   the next enqueue, and that work cannot be captured. A binding change drops the graph,
   which only holds for the bindings it was captured with;
4. returns fresh tensors the caller owns, never the reused output buffers (the pipeline
   keeps outputs across calls, e.g. in scheduler history): clones made on the engine's
   stream (the caller's stream waits for them) when the caller passes GPU tensors, else
   host copies.

A UNet built with per-row LoRA inputs gets them from its LoRA feed (graph_feed.py) when
the caller passes only the usual inputs. The adapter stacks are not copied into input
buffers: each is bound by address (`set_tensor_address`) to the stack's own device tensor,
rebinding (and dropping a captured graph) only when an address changes, e.g. when an
adapter first targets a layer; slot writes happen in place, so a replayed graph reads them.

TensorRT is imported only when an engine is created, so this module imports anywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kiln_server.engines.base import EngineError
from kiln_server.engines.buffers import (
    BufferCache,
    ProfileShapes,
    Shape,
    plan_buffers,
    profile_is_static,
    request_from_shapes,
    select_profile,
)
from kiln_server.engines.components import (
    LORA_SCALES_INPUT,
    LORA_SLOTS_INPUT,
    ComponentSpec,
    ShapeRequest,
)
from kiln_server.engines.machine import require_tensorrt

if TYPE_CHECKING:
    from kiln_server.lora.graph_feed import CompiledLora

log = logging.getLogger(__name__)


class TensorRTRuntime:
    """What the engines of one model share: TensorRT runtime, CUDA stream, scratch memory."""

    def __init__(self, device: int = 0) -> None:
        """Import TensorRT and create the runtime and stream (EngineError when unavailable)."""
        self.trt = require_tensorrt("serve with --backend tensorrt")
        self.device = torch.device("cuda", device)
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        self.stream = torch.cuda.Stream(device=self.device)
        self.scratch: torch.Tensor | None = None
        self.engines: list[TensorRTEngine] = []

    def current_stream(self) -> Any:
        """The caller's current CUDA stream on this runtime's device."""
        return torch.cuda.current_stream(self.device)

    def on_stream(self) -> Any:
        """A context manager making this runtime's stream the current one."""
        return torch.cuda.stream(self.stream)

    def capture(self, enqueue: Callable[[], None]) -> Any:
        """Record what `enqueue` puts on this runtime's stream as a CUDA graph; return it.

        Raises whatever the capture raises (the caller falls back to plain calls).
        """
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            enqueue()
        return graph

    def close(self) -> None:
        """Drop every engine and the scratch memory (after the stream's work finished)."""
        self.stream.synchronize()
        self.engines.clear()
        self.scratch = None

    def deserialize(self, path: Path, component: str) -> Any:
        """Deserialize the engine file at `path`; EngineError when unreadable or rejected."""
        try:
            plan = path.read_bytes()
        except OSError as exc:
            raise EngineError(
                f"cannot read TensorRT engine {path} for {component!r}: {exc}"
            ) from exc
        engine = self.runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise EngineError(
                f"TensorRT rejected the engine file {path} for {component!r} (see the TensorRT "
                "log above): it is corrupt or was built for another GPU or TensorRT version; "
                "rebuild it on this machine with `kiln build-engines --format tensorrt`"
            )
        return engine

    def load(self, spec: ComponentSpec, path: Path, *, cuda_graphs: bool = True) -> TensorRTEngine:
        """Deserialize `path` into a resident engine bound to this runtime's stream."""
        engine = TensorRTEngine(spec, self.deserialize(path, spec.name), self, cuda_graphs)
        self.engines.append(engine)
        return engine

    def share_device_memory(self) -> int:
        """Give every loaded engine's context one scratch block sized for the largest.

        Returns the block's size in bytes. Must be called after the last `load` and before
        the first call; the engines then share the memory, which is safe because all of
        them run on this runtime's one stream.
        """
        size = max((e.device_memory_size for e in self.engines), default=0)
        # torch's allocator aligns blocks to 512 bytes; TensorRT needs 256.
        self.scratch = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
        for engine in self.engines:
            engine.set_device_memory(self.scratch.data_ptr(), size)
        return size


@dataclass
class _ShapeBuffers:
    """Device buffers for one call shape, and the CUDA graph replaying it when captured."""

    request: ShapeRequest
    profile: int
    static: bool
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    runs: int = 0
    # Runs since the context was last bound to these buffers: a graph is captured only
    # once a plain run has followed the binding.
    runs_since_bind: int = 0
    graph: Any = None
    graph_failed: bool = False


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, np.dtype(name).name)
    assert isinstance(dtype, torch.dtype)
    return dtype


def _profile_bounds(engine: Any, name: str, profile: int) -> tuple[Shape, Shape, Shape]:
    """(min, opt, max) shape of input `name` in `profile`, as stored in the engine."""
    low, opt, high = (
        tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(name, profile)
    )
    return low, opt, high


class TensorRTEngine:
    """One component's TensorRT engine with its execution context and per-shape buffers.

    One call at a time: engines of a runtime share a stream and scratch memory. `profiles`
    lists each optimization profile's (min, opt, max) shape per input, and `max_batch` the
    most rows one call takes; both are read from the engine itself.
    """

    def __init__(
        self, spec: ComponentSpec, engine: Any, runtime: TensorRTRuntime, cuda_graphs: bool
    ) -> None:
        trt = runtime.trt
        self.spec = spec
        self.engine = engine
        self.runtime = runtime
        self.cuda_graphs = cuda_graphs
        self._check_interface(trt)
        self.profiles: list[ProfileShapes] = [
            {t.name: _profile_bounds(engine, t.name, index) for t in spec.inputs}
            for index in range(engine.num_optimization_profiles)
        ]
        first_input = spec.inputs[0].name
        # Rows one call can take: the largest batch any profile admits.
        self.max_batch: int | None = max(p[first_input][2][0] for p in self.profiles)
        self.context = engine.create_execution_context(
            trt.ExecutionContextAllocationStrategy.USER_MANAGED
        )
        if self.context is None:
            raise EngineError(f"TensorRT could not create an execution context for {spec.name}")
        # TensorRT 10.1+ reports the scratch size with device_memory_size_v2; 10.0 without.
        if hasattr(engine, "device_memory_size_v2"):
            self.device_memory_size = int(engine.device_memory_size_v2)
        else:
            self.device_memory_size = int(engine.device_memory_size)
        self._buffers: BufferCache[_ShapeBuffers] = BufferCache(capacity=4)
        self._bound: _ShapeBuffers | None = None
        self._has_memory = False
        # A UNet's LoRA wiring (set by the loader); its stacks are bound, never copied.
        self.lora: CompiledLora | None = None
        self._external = external_inputs(spec)
        self._external_addresses: dict[str, int] = {}
        self._external_alive: dict[str, torch.Tensor] = {}

    def _check_interface(self, trt: Any) -> None:
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        expected = [t.name for t in self.spec.tensors]
        if sorted(names) != sorted(expected):
            raise EngineError(
                f"TensorRT engine for {self.spec.name} has tensors {names}, the declaration "
                f"needs {expected}; rebuild it with `kiln build-engines --format tensorrt`"
            )
        for tensor in self.spec.tensors:
            is_input = self.engine.get_tensor_mode(tensor.name) == trt.TensorIOMode.INPUT
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(tensor.name)))
            if is_input != (tensor in self.spec.inputs) or dtype != tensor.numpy_dtype:
                raise EngineError(
                    f"TensorRT engine for {self.spec.name}: tensor {tensor.name!r} is "
                    f"{'an input' if is_input else 'an output'} of dtype {dtype}, the "
                    f"declaration says {tensor.dtype}; rebuild it with `kiln build-engines`"
                )

    def set_device_memory(self, pointer: int, size: int) -> None:
        """Use `size` bytes at device address `pointer` as this context's scratch memory."""
        if hasattr(self.context, "set_device_memory"):  # TensorRT 10.1+: address and size
            self.context.set_device_memory(pointer, size)
        else:
            self.context.device_memory = pointer
        self._has_memory = True

    def _allocate(self, request: ShapeRequest) -> _ShapeBuffers:
        plan = plan_buffers(self.spec, request)
        shapes: dict[str, Shape] = {b.name: b.shape for b in plan.inputs}
        profile = select_profile(self.profiles, shapes)
        if profile is None:
            raise EngineError(
                f"the TensorRT engine for {self.spec.name} has no profile for "
                f"{self.spec.describe_call(request)} (profiles: "
                f"{describe_profiles(self.profiles)}); rebuild it with wider ranges: "
                "`kiln build-engines --format tensorrt` without --batch-sizes, --min-size, "
                "--max-size or --vae-batch covers every request the model allows"
            )
        device = self.runtime.device

        def empty(buffer: Any) -> torch.Tensor:
            return torch.empty(buffer.shape, dtype=_torch_dtype(buffer.dtype), device=device)

        return _ShapeBuffers(
            request=request,
            profile=profile,
            static=profile_is_static(self.profiles[profile]),
            inputs={b.name: empty(b) for b in plan.inputs if b.name not in self._external},
            outputs={b.name: empty(b) for b in plan.outputs},
        )

    def _bind(self, buffers: _ShapeBuffers, external: Mapping[str, torch.Tensor]) -> None:
        """Point the context at `buffers` and the `external` inputs (bound where they are):
        profile, input shapes, every tensor address."""
        stream = self.runtime.stream.cuda_stream
        if self._bound is not None:
            self._bound.graph = None  # a graph is only valid for the bindings it captured
        buffers.graph = None
        buffers.runs_since_bind = 0
        if self.context.active_optimization_profile != buffers.profile and not (
            self.context.set_optimization_profile_async(buffers.profile, stream)
        ):
            raise EngineError(f"TensorRT refused profile {buffers.profile} for {self.spec.name}")
        for name, tensor in {**buffers.inputs, **external}.items():
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise EngineError(
                    f"TensorRT refused shape {tuple(tensor.shape)} for {self.spec.name}.{name}"
                )
        for name, tensor in {**buffers.inputs, **external, **buffers.outputs}.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        self._external_addresses = {name: t.data_ptr() for name, t in external.items()}
        for name, tensor in buffers.outputs.items():
            shape = tuple(self.context.get_tensor_shape(name))
            if shape != tuple(tensor.shape):
                raise EngineError(
                    f"TensorRT computes shape {shape} for {self.spec.name}.{name}, the "
                    f"declaration gives {tuple(tensor.shape)}"
                )
        self._bound = buffers

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.runtime.stream.cuda_stream):
            raise EngineError(f"TensorRT failed to run {self.spec.name} (see the TensorRT log)")

    def _capture(self, buffers: _ShapeBuffers) -> None:
        """Record this shape's enqueue as a CUDA graph; fall back to plain calls on failure."""
        try:
            graph = self.runtime.capture(self._execute)
        except Exception as exc:  # capture is an optimization: never fail the call for it
            log.warning("CUDA graph capture failed for %s: %s", self.spec.name, exc)
            buffers.graph_failed = True
            self._execute()
            return
        buffers.graph = graph
        graph.replay()

    def infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the engine once; returns every output as a fresh tensor the caller owns.

        Outputs are on the engine's GPU when any input is on a GPU (the caller's current
        stream waits for them), else on the host (copied back and synchronized), so a CPU
        pipeline drives the engine unchanged. No later call writes into them. A UNet with
        LoRA inputs takes all of them or none (its LoRA feed then supplies them). Raises
        EngineError when the inputs do not fit the declaration or any profile.
        """
        from kiln_server.lora.graph_feed import with_lora_inputs

        if not self._has_memory:
            raise EngineError(
                f"TensorRT engine for {self.spec.name} has no device memory: call "
                "TensorRTRuntime.share_device_memory() after loading"
            )
        on_device = any(value.device.type != "cpu" for value in inputs.values())
        inputs = with_lora_inputs(self.spec, inputs, self.lora.feed if self.lora else None)
        try:
            self.spec.check_inputs(inputs)
        except ValueError as exc:
            raise EngineError(str(exc)) from exc
        request = request_from_shapes(self.spec, {k: tuple(v.shape) for k, v in inputs.items()})
        buffers = self._buffers.get(request, self._allocate)
        external = self._external_tensors(inputs)
        stream = self.runtime.stream
        caller = self.runtime.current_stream()
        stream.wait_stream(caller)
        with self.runtime.on_stream():
            for name, target in buffers.inputs.items():
                value = inputs[name]
                if value.is_cuda:
                    value.record_stream(stream)
                target.copy_(value, non_blocking=True)
            if self._bound is not buffers or any(
                self._external_addresses.get(name) != t.data_ptr() for name, t in external.items()
            ):
                self._bind(buffers, external)
            self._run(buffers)
            if not on_device:
                # A blocking copy to fresh pageable memory: returns once the run finished.
                return {name: t.to("cpu", copy=True) for name, t in buffers.outputs.items()}
            outputs = {name: t.clone() for name, t in buffers.outputs.items()}
        caller.wait_stream(stream)
        for tensor in outputs.values():
            if tensor.is_cuda:
                # Made on the engine's stream, used on the caller's: keep the memory from
                # being reused before the caller's work on it is done.
                tensor.record_stream(caller)
        return outputs

    def _external_tensors(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inputs bound where they are (LoRA stacks): the caller's tensors when they are
        contiguous float32 on the engine's GPU, else device copies (a test's CPU stacks)."""
        external = {}
        for name in self._external:
            value = inputs[name]
            if value.device != self.runtime.device or value.dtype != torch.float32:
                value = value.to(device=self.runtime.device, dtype=torch.float32)
            external[name] = value.contiguous()
        # Copies must live until the run is done: the bound addresses point into them.
        self._external_alive = external
        return external

    def _run(self, buffers: _ShapeBuffers) -> None:
        """Enqueue one run of the bound `buffers`: replay, capture, or a plain call."""
        buffers.runs += 1
        buffers.runs_since_bind += 1
        if buffers.graph is not None:
            buffers.graph.replay()
        elif (
            self.cuda_graphs
            and buffers.static
            and buffers.runs_since_bind >= 2
            and not buffers.graph_failed
        ):
            # A plain run since the binding did TensorRT's deferred set-up; now the
            # enqueue is capturable.
            self._capture(buffers)
        else:
            self._execute()


def external_inputs(spec: ComponentSpec) -> frozenset[str]:
    """Inputs bound by address instead of copied into per-shape buffers: a LoRA UNet's
    adapter stacks (large, changed in place only between calls, the same for every shape)."""
    if spec.lora is None:
        return frozenset()
    names = {t.name for t in spec.lora.tensors()}
    return frozenset(names - {LORA_SLOTS_INPUT, LORA_SCALES_INPUT})


def describe_profiles(profiles: Sequence[ProfileShapes]) -> str:
    """What each profile accepts, input by input, for error messages."""
    parts = []
    for index, profile in enumerate(profiles):
        ranges = ", ".join(
            f"{name} {list(low)}" if low == high else f"{name} {list(low)}..{list(high)}"
            for name, (low, _, high) in profile.items()
        )
        parts.append(f"#{index}: {ranges}")
    return "; ".join(parts) or "none"
