"""After a TensorRT build: run each engine beside onnxruntime on the same graph and inputs.

The engine runs through the server's own TensorRT runtime (`TensorRTEngine`, so profile
selection and buffer binding are checked too), the reference through onnxruntime's CPU
provider in fp32: a CUDA provider may use TF32, which would blur the reference by as much
as the engine's own rounding. Both get the same seeded inputs (`sample_inputs`) at the
static profile's shape (the default size) and at the dynamic profile's smallest shape, and
the verdict and record come from `engine_numerics`.

Polygraphy's comparator could run both too, but its checks are element-wise
(|a - b| <= atol + rtol * |b|), which fp16 outputs fail on near-zero elements unless atol
is tuned per component, and its TensorRT runner bypasses Kiln's runtime; the scale-relative
metric here is the export validation's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kiln_server.engines.components import ComponentSpec, ShapeRange, ShapeRequest
from kiln_server.engines.engine_numerics import NumericsRecord, judge_numerics

REFERENCE_PROVIDER = "CPUExecutionProvider"
SEED = 4321


def numerics_shapes(ranges: Sequence[ShapeRange]) -> list[ShapeRequest]:
    """Shapes to compare at: the first profile's optimum, then the last one's minimum.

    For image-sized components that is one image at the default size (the static
    profile) and one row at the smallest size (the dynamic profile); for text encoders
    both ends of their single profile. Duplicates are dropped.
    """
    if not ranges:
        raise ValueError("an engine has at least one profile")
    shapes = [ranges[0].opt]
    if ranges[-1].min not in shapes:
        shapes.append(ranges[-1].min)
    return shapes


def check_engine_numerics(
    spec: ComponentSpec,
    onnx_path: Path,
    engine_path: Path,
    ranges: Sequence[ShapeRange],
    precision: str,
    *,
    seed: int = SEED,
) -> NumericsRecord:
    """Compare the engine at `engine_path` with `onnx_path` in onnxruntime; return the record.

    Never raises for a mismatch (the record's `passed` says); raises EngineError when
    TensorRT or CUDA is missing or the engine cannot load, and ValidationError when an
    output has the wrong shape.
    """
    from kiln_server.engines.machine import require_tensorrt

    require_tensorrt("check TensorRT engines against onnxruntime")
    import onnxruntime as ort
    import torch

    from kiln_build.validate import relative_errors
    from kiln_server.engines.sample_inputs import sample_inputs
    from kiln_server.engines.tensorrt_engine import TensorRTRuntime

    session = ort.InferenceSession(str(onnx_path), providers=[REFERENCE_PROVIDER])
    names = [t.name for t in spec.outputs]
    runtime = TensorRTRuntime()
    try:
        engine = runtime.load(spec, engine_path, cuda_graphs=False)
        runtime.share_device_memory()
        results = []
        for index, request in enumerate(numerics_shapes(ranges)):
            inputs = sample_inputs(spec, request, seed=seed + index)
            expected = dict(
                zip(
                    names,
                    session.run(names, {k: v.numpy() for k, v in inputs.items()}),
                    strict=True,
                )
            )
            outputs = engine.infer({k: v.to(runtime.device) for k, v in inputs.items()})
            actual = {name: outputs[name].cpu().numpy() for name in names}
            results.append((request, relative_errors(expected, actual)))
    finally:
        runtime.close()
        torch.cuda.empty_cache()
    return judge_numerics(results, precision, reference=f"onnxruntime {REFERENCE_PROVIDER}")
