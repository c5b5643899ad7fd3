"""The onnxruntime backend: exported ONNX graphs run by onnxruntime (CPU here, CUDA on a GPU).

Each engine holds one InferenceSession for the life of the process. Calls go through
IOBinding: inputs are bound by address straight from the caller's tensors (no copy), and
outputs are written into fresh torch tensors on the engine's device that the caller owns
(torch's allocators make that cheap; reused buffers would be overwritten under a
scheduler that keeps past predictions).

A UNet graph built with per-row LoRA inputs gets them from its `lora_feed`
(`lora.feed`, kiln_server.lora.graph_feed) when the caller passes only the usual inputs: the adapter
stacks are bound by address from the stack's own tensors, so no step copies them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kiln_server.engines.base import EngineError
from kiln_server.engines.buffers import plan_buffers, request_from_shapes
from kiln_server.engines.components import ComponentSpec, ShapeRequest

if TYPE_CHECKING:
    from kiln_server.lora.graph_feed import CompiledLora


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


def cuda_provider_available() -> bool:
    """Whether onnxruntime can run graphs on a GPU here (onnxruntime-gpu and a device)."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


def default_providers(device: torch.device | None = None) -> list[Any]:
    """The CUDA provider on `device` when it is a GPU that onnxruntime-gpu can use, else the CPU.

    With no `device`, the first GPU when there is one.
    """
    wants_cuda = device is None or device.type == "cuda"
    if wants_cuda and cuda_provider_available():
        index = 0 if device is None or device.index is None else device.index
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def providers_device(providers: list[Any]) -> torch.device:
    """The device a session with `providers` runs on: the GPU of a leading CUDA provider
    (its `device_id` option), else the CPU."""
    first = providers[0]
    name, options = first if isinstance(first, tuple) else (first, {})
    if name == "CUDAExecutionProvider":
        return torch.device("cuda", int(options.get("device_id", 0)))
    return torch.device("cpu")


class OnnxRuntimeEngine:
    """Runs one component's ONNX graph with onnxruntime on the CPU or one GPU.

    One call at a time (the batcher's single worker); every call's outputs are new tensors.
    """

    def __init__(
        self,
        spec: ComponentSpec,
        path: Path,
        *,
        providers: list[Any] | None = None,
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
        self.device = providers_device(self.providers)
        self._binding = self.session.io_binding()
        # A UNet's LoRA wiring (set by the loader): its feed when built with LoRA inputs.
        self.lora: CompiledLora | None = None

    @property
    def _device_id(self) -> int:
        return self.device.index or 0

    def _bind_outputs(self, request: ShapeRequest) -> dict[str, torch.Tensor]:
        outputs: dict[str, torch.Tensor] = {}
        for buffer in plan_buffers(self.spec, request).outputs:
            tensor = torch.empty(
                buffer.shape, dtype=getattr(torch, buffer.dtype), device=self.device
            )
            self._binding.bind_output(
                buffer.name,
                self.device.type,
                self._device_id,
                _numpy_dtype(buffer.dtype),
                list(buffer.shape),
                tensor.data_ptr(),
            )
            outputs[buffer.name] = tensor
        return outputs

    def infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the graph once; returns the declared outputs as new tensors on its device.

        Inputs are moved to the engine's device, converted to the declared dtype and made
        contiguous when they are not. A UNet with LoRA inputs takes either all of them or
        none (its LoRA feed then supplies them). Raises EngineError when the inputs' shapes
        do not fit the declaration or the run fails.
        """
        from kiln_server.lora.graph_feed import with_lora_inputs

        inputs = with_lora_inputs(self.spec, inputs, self.lora.feed if self.lora else None)
        try:
            self.spec.check_inputs(inputs)
        except ValueError as exc:
            raise EngineError(str(exc)) from exc
        request = request_from_shapes(self.spec, {k: tuple(v.shape) for k, v in inputs.items()})
        outputs = self._bind_outputs(request)
        keep_alive = []
        for tensor_spec in self.spec.inputs:
            value = inputs[tensor_spec.name].to(
                device=self.device, dtype=getattr(torch, tensor_spec.dtype)
            )
            value = value.contiguous()
            keep_alive.append(value)
            self._binding.bind_input(
                tensor_spec.name,
                self.device.type,
                self._device_id,
                _numpy_dtype(tensor_spec.dtype),
                list(value.shape),
                value.data_ptr(),
            )
        try:
            if self.device.type == "cuda":
                # onnxruntime runs on its own stream: the inputs must be written first.
                torch.cuda.current_stream(self.device).synchronize()
            self.session.run_with_iobinding(self._binding)
        except Exception as exc:
            raise EngineError(f"onnxruntime failed running {self.spec.name}: {exc}") from exc
        finally:
            self._binding.clear_binding_inputs()
            self._binding.clear_binding_outputs()
        del keep_alive
        return outputs


def _numpy_dtype(name: str) -> Any:
    import numpy as np

    return np.dtype(name).type
