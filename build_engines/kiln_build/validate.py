"""Validation: each exported graph against its torch module, on fresh inputs, at new shapes.

The graph runs in onnxruntime with the same session options the server uses (so the
fused, optimized graph is what is checked), and the torch wrapper runs eagerly. Shapes
differ from the export shape in batch (1 and 3 rows; the export traced 2) and include a
non-square size, which catches any dimension the tracer baked in as a constant.

Error metric, per output: max |graph - torch| / max |torch| (relative to the output's scale,
so near-zero elements do not make the ratio meaningless). It must be at most `rtol`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kiln_server.engines.base import EngineError
from kiln_server.engines.components import ComponentSpec, ShapeRequest
from kiln_server.engines.sample_inputs import sample_inputs

DEFAULT_RTOL = 1e-3
# Sizes move by this many pixels: a multiple of SDXL's 8x VAE and its UNet's 4x latent
# downsampling, so every validation size is one a real SDXL model accepts.
SIZE_STEP = 32


class ValidationError(EngineError):
    """A graph disagrees with its torch module; the message names component, shape, error."""


@dataclass(frozen=True)
class ShapeCheck:
    """The comparison at one shape: worst relative and absolute error over the outputs."""

    component: str
    request: ShapeRequest
    max_rel_error: float
    max_abs_error: float
    worst_output: str

    def describe(self) -> str:
        """E.g. 'unet batch 3 at 96x64: rel 2.1e-06 (noise_pred)'."""
        size = f" at {self.request.width}x{self.request.height}" if self.request.height else ""
        return (
            f"{self.component} batch {self.request.batch}{size}: rel {self.max_rel_error:.2e}, "
            f"abs {self.max_abs_error:.2e} ({self.worst_output})"
        )

    def to_json(self) -> dict[str, object]:
        """The record kept in the manifest."""
        return {
            "batch": self.request.batch,
            "height": self.request.height,
            "width": self.request.width,
            "max_rel_error": self.max_rel_error,
            "max_abs_error": self.max_abs_error,
        }


def validation_requests(
    spec: ComponentSpec, default: ShapeRequest, size_multiple: int = SIZE_STEP
) -> list[ShapeRequest]:
    """Shapes to validate at, none equal to the export shape (2 rows at the default size).

    Text encoders: 1 and 3 rows. Image-sized components: 1 row at the default size, 3 rows
    landscape and 2 rows portrait, one step wider and taller: SIZE_STEP, or the graphs'
    size multiple when that is larger (so every size is one the graphs accept).
    """
    h, w = default.height, default.width
    if not spec.image_sized:
        return [ShapeRequest(1, h, w), ShapeRequest(3, h, w)]
    step = max(SIZE_STEP, size_multiple)
    return [
        ShapeRequest(1, h, w),
        ShapeRequest(3, h, w + step),
        ShapeRequest(2, h + step, w),
    ]


def relative_errors(
    expected: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray]
) -> dict[str, tuple[float, float]]:
    """Per output: (max |a - e| / max |e|, max |a - e|). Shapes must match exactly."""
    errors: dict[str, tuple[float, float]] = {}
    for name, want in expected.items():
        got = actual[name]
        if got.shape != want.shape:
            raise ValidationError(
                f"output {name!r} has shape {got.shape}, torch gives {want.shape}"
            )
        want64 = want.astype(np.float64)
        diff = float(np.max(np.abs(got.astype(np.float64) - want64))) if want.size else 0.0
        scale = float(np.max(np.abs(want64))) if want.size else 0.0
        if not np.isfinite(diff):
            errors[name] = (float("inf"), float("inf"))
        else:
            errors[name] = (diff / scale if scale > 0 else diff, diff)
    return errors


def validate_graph(
    spec: ComponentSpec,
    module: torch.nn.Module,
    path: Path,
    requests: Sequence[ShapeRequest],
    *,
    rtol: float = DEFAULT_RTOL,
    seed: int = 1234,
) -> list[ShapeCheck]:
    """Compare the graph at `path` with `module` at each request's shape.

    Every shape gets fresh seeded inputs. Returns one ShapeCheck per shape; raises
    ValidationError naming the component, shape and error when any output's relative error
    exceeds `rtol` (or the graph's outputs have the wrong shape).
    """
    import onnxruntime as ort

    from kiln_server.engines.onnxruntime_engine import session_options

    session = ort.InferenceSession(
        str(path), sess_options=session_options(), providers=["CPUExecutionProvider"]
    )
    output_names = [t.name for t in spec.outputs]
    checks: list[ShapeCheck] = []
    for index, request in enumerate(requests):
        inputs = sample_inputs(spec, request, seed=seed + index)
        with torch.inference_mode():
            result = module(*(inputs[t.name] for t in spec.inputs))
        outputs = result if isinstance(result, tuple) else (result,)
        expected = {n: o.numpy() for n, o in zip(output_names, outputs, strict=True)}
        actual_list = session.run(output_names, {k: v.numpy() for k, v in inputs.items()})
        actual = dict(zip(output_names, actual_list, strict=True))
        errors = relative_errors(expected, actual)
        worst = max(errors, key=lambda n: errors[n][0])
        check = ShapeCheck(spec.name, request, errors[worst][0], errors[worst][1], worst)
        if not check.max_rel_error <= rtol:
            raise ValidationError(
                f"the exported {check.describe()} exceeds the {rtol:g} relative tolerance: the "
                "graph does not compute what the torch module does at this shape"
            )
        checks.append(check)
    return checks
