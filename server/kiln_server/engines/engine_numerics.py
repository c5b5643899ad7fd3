"""The numerics check of a built TensorRT engine: its manifest record and the verdict.

After a TensorRT build each engine runs on seeded inputs beside onnxruntime running the
same ONNX graph in fp32, and the result is kept in the manifest (`numerics` of each
TensorRT component). The error metric per output is scale-relative, as in the export's
validation: max |engine - reference| / max |reference|, so near-zero elements do not make
the ratio meaningless; the worst output and shape decide.

Tolerances follow the engine's precision: fp16 engines round every activation to 11
significant bits, and TensorRT's fp32 engines may use TF32 for convolutions and matrix
products (10-bit mantissas, on by default), so both land around 1e-3 on SDXL; bf16 keeps 8
bits, so its tolerance is wider. The tolerances leave room for rounding and still catch
what matters (an fp16 overflow that turns outputs into inf or NaN, a wrongly parsed layer,
a broken profile), whose errors are of order 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kiln_server.engines.components import ShapeRequest

NUMERICS_REFERENCE = "onnxruntime"
# Largest scale-relative error a passing engine may show, by engine precision.
TOLERANCES = {"fp16": 2e-2, "bf16": 5e-2, "fp32": 1e-2}


def tolerance_for(precision: str) -> float:
    """The relative tolerance for an engine built in `precision` (fp16's for unknown ones)."""
    return TOLERANCES.get(precision, TOLERANCES["fp16"])


def _describe_shape(request: ShapeRequest) -> str:
    size = f" at {request.width}x{request.height}" if request.height else ""
    return f"batch {request.batch}{size}"


@dataclass(frozen=True)
class NumericsRecord:
    """One engine compared with the reference: where, how far off, and the verdict.

    `max_rel_error` is max |engine - reference| / max |reference| over every output and
    shape (inf when the engine produced non-finite values the reference did not);
    `max_abs_error` the largest absolute difference; `worst_output` and `worst_shape`
    where the relative error peaked. `passed` is `max_rel_error <= tolerance`.
    """

    reference: str
    shapes: tuple[ShapeRequest, ...]
    max_abs_error: float
    max_rel_error: float
    worst_output: str
    worst_shape: ShapeRequest
    tolerance: float
    passed: bool

    def describe(self) -> str:
        """One line for the build report, e.g. 'rel 3.1e-03 (noise_pred, batch 2 at 64x64)'."""
        return (
            f"rel {self.max_rel_error:.1e}, abs {self.max_abs_error:.1e} "
            f"({self.worst_output}, {_describe_shape(self.worst_shape)}) against "
            f"{self.reference}, tolerance {self.tolerance:g}: "
            f"{'passed' if self.passed else 'FAILED'}"
        )

    def to_json(self) -> dict[str, Any]:
        """The record as kept in the manifest (non-finite errors are written as null)."""

        def number(value: float) -> float | None:
            return value if math.isfinite(value) else None

        def shape(request: ShapeRequest) -> dict[str, int]:
            return {"batch": request.batch, "height": request.height, "width": request.width}

        return {
            "reference": self.reference,
            "shapes": [shape(s) for s in self.shapes],
            "max_abs_error": number(self.max_abs_error),
            "max_rel_error": number(self.max_rel_error),
            "worst_output": self.worst_output,
            "worst_shape": shape(self.worst_shape),
            "tolerance": self.tolerance,
            "passed": self.passed,
        }


def numerics_from_json(data: Any) -> NumericsRecord:
    """Parse a record written by `NumericsRecord.to_json`.

    Raises ValueError naming the field when it is missing or has the wrong type.
    """
    if not isinstance(data, dict):
        raise ValueError("is not an object")

    def field(key: str, kind: type | tuple[type, ...]) -> Any:
        if key not in data:
            raise ValueError(f"lacks {key!r}")
        value = data[key]
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ValueError(f"has the wrong type in {key!r}")
        return value

    def error(key: str) -> float:
        value = field(key, (int, float, type(None)))
        return math.inf if value is None else float(value)

    def shape(value: Any, key: str) -> ShapeRequest:
        if not isinstance(value, dict):
            raise ValueError(f"has the wrong type in {key!r}")
        sizes = [value.get(k) for k in ("batch", "height", "width")]
        ints = [s for s in sizes if isinstance(s, int) and not isinstance(s, bool)]
        if len(ints) != len(sizes):
            raise ValueError(f"has the wrong type in {key!r}")
        return ShapeRequest(*ints)

    return NumericsRecord(
        reference=field("reference", str),
        shapes=tuple(shape(s, "shapes") for s in field("shapes", list)),
        max_abs_error=error("max_abs_error"),
        max_rel_error=error("max_rel_error"),
        worst_output=field("worst_output", str),
        worst_shape=shape(field("worst_shape", dict), "worst_shape"),
        tolerance=float(field("tolerance", (int, float))),
        passed=field("passed", bool),
    )


def judge_numerics(
    results: Sequence[tuple[ShapeRequest, Mapping[str, tuple[float, float]]]],
    precision: str,
    reference: str = NUMERICS_REFERENCE,
) -> NumericsRecord:
    """The record of one engine from its errors at each shape checked.

    `results` holds, per shape, each output's (relative, absolute) error; a NaN error (a
    non-finite difference) counts as infinite. The verdict uses `tolerance_for(precision)`.
    """
    if not results or not all(errors for _, errors in results):
        raise ValueError("judge_numerics needs at least one output at one shape")
    worst_rel, worst_abs = -1.0, 0.0
    worst_output, worst_shape = "", results[0][0]
    for request, errors in results:
        for output, (rel, abs_error) in errors.items():
            rel = rel if not math.isnan(rel) else math.inf
            abs_error = abs_error if not math.isnan(abs_error) else math.inf
            worst_abs = max(worst_abs, abs_error)
            if rel > worst_rel:
                worst_rel, worst_output, worst_shape = rel, output, request
    tolerance = tolerance_for(precision)
    return NumericsRecord(
        reference=reference,
        shapes=tuple(request for request, _ in results),
        max_abs_error=worst_abs,
        max_rel_error=worst_rel,
        worst_output=worst_output,
        worst_shape=worst_shape,
        tolerance=tolerance,
        passed=worst_rel <= tolerance,
    )


def numerics_failure(component: str, precision: str, record: NumericsRecord) -> str:
    """The build's error message for an engine that failed its check.

    Names the component, the worst output and shape, the errors and the tolerance, and
    what to do (--skip-numerics-check keeps such engines, at the risk of wrong images).
    """
    if math.isfinite(record.max_rel_error):
        how = (
            f"max relative error {record.max_rel_error:.2e} (max absolute error "
            f"{record.max_abs_error:.2e}) exceeds the {precision} tolerance {record.tolerance:g}"
        )
    else:
        how = (
            "it produced non-finite values (inf or NaN) where the reference did not (an "
            f"overflow in {precision})"
        )
    return (
        f"the TensorRT engine for {component!r} does not compute what its ONNX graph does in "
        f"{record.reference}: {how} in output {record.worst_output!r} at "
        f"{_describe_shape(record.worst_shape)}; it would produce wrong images. Rebuild "
        "it (a newer TensorRT, or without --refittable), or pass --skip-numerics-check to "
        "keep engines without this check"
    )
