"""ONNX export of one component: trace its torch wrapper exactly as declared.

The traced module is the same wrapper the torch backend runs (engines/torch_modules.py),
so the graph and the eager reference compute one function. Input and output names and
dynamic axes come from the component declaration; nothing here restates a shape.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln_server.engines.base import EngineError
from kiln_server.engines.components import ComponentSpec, ShapeRequest
from kiln_server.engines.sample_inputs import sample_inputs

DEFAULT_OPSET = 17
MIN_OPSET = 17


@dataclass(frozen=True)
class ExportResult:
    """Where the raw (uncleaned) graph went and how long tracing took."""

    component: str
    path: Path
    opset: int
    seconds: float


def export_request(default: ShapeRequest) -> ShapeRequest:
    """The shape the graph is traced at: two rows (never 1, so no axis is traced as a
    broadcastable singleton) at the model's default size."""
    return ShapeRequest(batch=2, height=default.height, width=default.width)


def export_component(
    spec: ComponentSpec,
    module: torch.nn.Module,
    path: Path,
    *,
    request: ShapeRequest,
    opset: int = DEFAULT_OPSET,
) -> ExportResult:
    """Trace `module` at `request`'s shapes and write the ONNX graph to `path`.

    Uses the TorchScript exporter (dynamo=False) with the declaration's input/output names
    and dynamic axes, constant folding on. Graphs over 2 GB are written with external data
    beside `path` by the exporter. Raises EngineError when the opset is below 17 or tracing
    fails.
    """
    if opset < MIN_OPSET:
        raise EngineError(
            f"--opset {opset} is too old: Kiln exports with opset {MIN_OPSET} or newer"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = sample_inputs(spec, request, seed=1)
    args = tuple(inputs[t.name] for t in spec.inputs)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            # Tracer warnings flag Python branches on shapes; validation at other shapes
            # is what proves the graph generalizes, so they are noise here.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_axes=spec.dynamic_axes(),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as exc:
        raise EngineError(f"exporting {spec.name} to ONNX failed: {exc}") from exc
    return ExportResult(spec.name, path, opset, time.perf_counter() - start)
