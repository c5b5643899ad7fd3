"""benchmarks/families.py keeps working: one torch server with an SDXL and a FLUX model,
FLUX alone on onnxruntime from freshly built engines, each phase's table rows, the
TensorRT row that says why it is not measured, and the summaries. Speed is not asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "families.py"
HEADING = "## SDXL and FLUX on one server (benchmarks/families.py)"


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT / "benchmarks",
        env={**os.environ, **(env or {})},
    )


def test_families_benchmark_reports_every_phase_and_backend(
    tmp_path: Path, kiln_cache_dir: Path
) -> None:
    results = tmp_path / "results.md"
    done = _run(
        *("--sdxl", "kiln-shapes", "--flux", "kiln-tiny-flux-dev"),
        *("--backends", "onnxruntime,torch", "--clients", "2", "--duration", "1"),
        *("--results", "--results-file", str(results)),
        env={"KILN_CACHE_DIR": str(kiln_cache_dir)},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    section = results.read_text()
    assert HEADING in section
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in rows[1:]]
    assert [tuple(row[:4]) for row in cells] == [
        ("flux alone", "flux", "torch", "2"),
        ("flux alone", "flux", "onnxruntime", "2"),
        ("flux alone", "flux", "tensorrt", "not measured: needs TensorRT and an NVIDIA GPU"),
        ("sdxl alone", "sdxl", "torch", "2"),
        ("mixed", "flux", "torch", "1"),
        ("mixed", "sdxl", "torch", "1"),
    ]
    for row in cells[:2] + cells[3:]:
        requests, images_per_second, errors = int(row[4]), float(row[5]), int(row[10])
        per_image, per_step = float(row[8]), float(row[9])
        assert requests >= 1 and images_per_second > 0 and errors == 0
        assert per_image > per_step > 0
    assert "- FLUX ONNX build (`kiln build-engines`" in section
    assert "- flux on onnxruntime:" in section
    assert "- flux: in the mixed phase" in section and "- sdxl: in the mixed phase" in section
    assert "- together the mixed phase's shares add to" in section
    assert "FLUX `kiln-tiny-flux-dev`" in section
    assert "1-minute load average" in section and " before the run, " in section


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--clients", "1"), "--clients must be between 2 and 64"),
        (("--backends", "torch,tensorrt"), "needs TensorRT and an NVIDIA GPU"),
        (("--backends", "cuda"), "choose from torch, onnxruntime"),
    ],
)
def test_bad_flags_name_the_flag(flags: tuple[str, ...], message: str) -> None:
    done = _run(*flags)
    assert done.returncode == 2
    assert message in done.stderr
