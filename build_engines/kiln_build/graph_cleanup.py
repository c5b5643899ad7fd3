"""Graph cleanup after export: constant folding and shape inference, then the ONNX checker.

Polygraphy folds constants (onnx-graphsurgeon with onnxruntime evaluating the constant
subgraphs, shape expressions included) and infers shapes, repeating until the graph stops
changing; dead nodes are removed. TensorRT parses the result faster and with fewer
unsupported-op surprises, and onnxruntime starts from a smaller graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln_server.engines.base import EngineError
from kiln_server.engines.components import ComponentSpec

# Graphs with more weight bytes than this keep their weights in one external data file
# (a single protobuf cannot exceed 2 GB; a real SDXL UNet in fp32 is about 10 GB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@dataclass(frozen=True)
class CleanupReport:
    """Node counts before and after, and where the graph (and any external data) went."""

    component: str
    nodes_before: int
    nodes_after: int
    path: Path
    external_data: Path | None


def _weight_bytes(model: object) -> int:
    import onnx

    assert isinstance(model, onnx.ModelProto)
    return sum(
        len(t.raw_data) if t.raw_data else onnx.numpy_helper.to_array(t).nbytes
        for t in model.graph.initializer
    )


def declare_interface(model: Any, spec: ComponentSpec) -> None:
    """Write the declaration's dims onto the graph's inputs and outputs.

    Shape inference names output dims after the expressions that compute them (e.g.
    'floor(2.0*floor(2.0*latent_height))'); the declared names ('image_height') are what
    the manifest, TensorRT profiles and readers expect.
    """
    values = {v.name: v for v in [*model.graph.input, *model.graph.output]}
    for tensor in spec.tensors:
        if tensor.name not in values:
            raise EngineError(f"the {spec.name} graph has no tensor named {tensor.name!r}")
        shape = values[tensor.name].type.tensor_type.shape
        if len(shape.dim) != len(tensor.dims):
            raise EngineError(
                f"the {spec.name} graph gives {tensor.name!r} {len(shape.dim)} dims, "
                f"the declaration {len(tensor.dims)}"
            )
        for dim, declared in zip(shape.dim, tensor.dims, strict=True):
            if isinstance(declared, int):
                dim.dim_value = declared
            else:
                dim.dim_param = declared


def cleanup_graph(
    spec: ComponentSpec,
    source: Path,
    target: Path,
    *,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> CleanupReport:
    """Fold constants, infer shapes and save `source` as `target`, then run the checker.

    The graph's inputs and outputs carry exactly the declaration's names and dims. Weights move to
    `target` + ".data" when they exceed `external_data_threshold` bytes. Raises EngineError
    when folding, inference or the ONNX checker (full check, by path so large graphs work)
    fails.
    """
    import onnx
    import onnxruntime
    from polygraphy.backend.onnx import fold_constants, infer_shapes, save_onnx
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    onnxruntime.set_default_logger_severity(3)  # folding sessions: errors only
    try:
        model = onnx.load(str(source))
        before = len(model.graph.node)
        model = fold_constants(
            model, num_passes=None, do_shape_inference=True, fold_shapes=True, error_ok=False
        )
        model = infer_shapes(model, error_ok=False)
        declare_interface(model, spec)
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError(f"cleaning the {spec.name} graph {source} failed: {exc}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    external: Path | None = None
    if _weight_bytes(model) > external_data_threshold:
        external = target.with_name(target.name + ".data")
        external.unlink(missing_ok=True)
        save_onnx(
            model, str(target), external_data_path=external.name, all_tensors_to_one_file=True
        )
    else:
        save_onnx(model, str(target))
    check_graph(spec.name, target)
    return CleanupReport(spec.name, before, len(model.graph.node), target, external)


def check_graph(component: str, path: Path) -> None:
    """Run the ONNX checker with full shape checking; EngineError naming the graph on failure."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises ValidationError and InferenceError
        raise EngineError(f"the {component} graph {path} fails the ONNX checker: {exc}") from exc
