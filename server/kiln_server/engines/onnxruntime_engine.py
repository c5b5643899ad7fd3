"""The onnxruntime backend: exported ONNX graphs run by onnxruntime (CPU here, CUDA on a GPU).

Each engine holds one InferenceSession for the life of the process. Calls go through
IOBinding: inputs are bound by address straight from the caller's tensors (no copy), and
outputs are written into torch tensors preallocated once per call shape and reused, so a
steady stream of same-sized requests allocates nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kiln_server.engines.base import EngineError
from kiln_server.engines.buffers import BufferCache, plan_buffers, request_from_shapes
from kiln_server.engines.components import ComponentSpec, ShapeRequest


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def session_options(threads: int | None = None) -> Any:
    """Session options tuned for diffusion graphs on a CPU.

    Full graph optimization (operator fusion, layout transforms), sequential execution with
    `threads` intra-op threads (default: every available core; `kiln serve
    --intra-op-threads` sets it), memory-pattern planning and the CPU arena so repeated
    same-shape calls reuse their intermediate buffers.
    """
    import onnxruntime as ort

    if not threads:
        threads = available_cores()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_mem_pattern = True
    options.enable_cpu_mem_arena = True
    options.log_severity_level = 3  # errors only
    # Worker threads spin briefly before sleeping; diffusion calls come back to back.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    return options


def default_providers() -> list[str]:
    """CUDA when onnxruntime-gpu sees a device, else the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@dataclass
class _Binding:
    """One call shape's IOBinding with its preallocated output tensors bound into it."""

    binding: Any
    outputs: dict[str, torch.Tensor]


class OnnxRuntimeEngine:
    """Runs one component's ONNX graph with onnxruntime, reusing per-shape output buffers.

    One call at a time (the batcher's single worker): the returned outputs are this
    engine's buffers and the next call of the same shape overwrites them.
    """

    def __init__(
        self,
        spec: ComponentSpec,
        path: Path,
        *,
        providers: list[str] | None = None,
        threads: int | None = None,
    ) -> None:
        """Create the session for the graph at `path` (EngineError when it cannot load).

        The graph's input and output names must be exactly the declaration's.
        """
        import onnxruntime as ort

        self.spec = spec
        self.max_batch: int | None = None  # dynamic axes: any batch
        self.path = path
        self.providers = providers or default_providers()
        try:
            self.session = ort.InferenceSession(
                str(path), sess_options=session_options(threads), providers=self.providers
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise EngineError(
                f"onnxruntime cannot load the {spec.name} graph {path}: {exc}; the file is "
                "corrupt or was exported for another version; rebuild it with "
                "`kiln build-engines --format onnx`"
            ) from exc
        graph_inputs = [i.name for i in self.session.get_inputs()]
        graph_outputs = [o.name for o in self.session.get_outputs()]
        if graph_inputs != [t.name for t in spec.inputs] or graph_outputs != [
            t.name for t in spec.outputs
        ]:
            raise EngineError(
                f"the {spec.name} graph {path} has inputs {graph_inputs} and outputs "
                f"{graph_outputs}, the declaration needs {[t.name for t in spec.inputs]} and "
                f"{[t.name for t in spec.outputs]}; rebuild it with `kiln build-engines`"
            )
        self.device = torch.device("cuda") if self.providers[0].startswith("CUDA") else None
        self._bindings: BufferCache[_Binding] = BufferCache(capacity=4)

    @property
    def _device_type(self) -> str:
        return "cuda" if self.device is not None else "cpu"

    def _allocate(self, request: ShapeRequest) -> _Binding:
        plan = plan_buffers(self.spec, request)
        binding = self.session.io_binding()
        outputs: dict[str, torch.Tensor] = {}
        for buffer in plan.outputs:
            tensor = torch.empty(
                buffer.shape, dtype=getattr(torch, buffer.dtype), device=self.device or "cpu"
            )
            binding.bind_output(
                buffer.name,
                self._device_type,
                0,
                _numpy_dtype(buffer.dtype),
                list(buffer.shape),
                tensor.data_ptr(),
            )
            outputs[buffer.name] = tensor
        return _Binding(binding=binding, outputs=outputs)

    def infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the graph once; returns the declared outputs in buffers reused by later calls.

        With the CUDA provider, outputs stay on the GPU when any input is there and are
        copied to the host otherwise.

        Inputs are converted to the declared dtype and made contiguous when they are not.
        Raises EngineError when the inputs' shapes do not fit the declaration or the run fails.
        """
        try:
            self.spec.check_inputs(inputs)
        except ValueError as exc:
            raise EngineError(str(exc)) from exc
        request = request_from_shapes(self.spec, {k: tuple(v.shape) for k, v in inputs.items()})
        entry = self._bindings.get(request, self._allocate)
        device = self.device or torch.device("cpu")
        keep_alive = []
        for tensor_spec in self.spec.inputs:
            value = inputs[tensor_spec.name].to(
                device=device, dtype=getattr(torch, tensor_spec.dtype)
            )
            value = value.contiguous()
            keep_alive.append(value)
            entry.binding.bind_input(
                tensor_spec.name,
                self._device_type,
                0,
                _numpy_dtype(tensor_spec.dtype),
                list(value.shape),
                value.data_ptr(),
            )
        try:
            if self.device is not None:
                torch.cuda.current_stream().synchronize()
            self.session.run_with_iobinding(entry.binding)
        except Exception as exc:
            raise EngineError(f"onnxruntime failed running {self.spec.name}: {exc}") from exc
        del keep_alive
        if self.device is not None and not any(v.is_cuda for v in inputs.values()):
            # CUDA provider, CPU caller: hand back host copies like the CPU provider does.
            return {name: tensor.cpu() for name, tensor in entry.outputs.items()}
        return dict(entry.outputs)


def _numpy_dtype(name: str) -> Any:
    import numpy as np

    return np.dtype(name).type
