"""benchmarks/adherence.py's FLUX table keeps working: a tiny run (2 prompts × 1 seed) of
`--tables flux` on the shipped kiln-flux-shapes writes its section, with every row's
percentages and image count, and the PASS/FAIL verdict, to a temporary results file,
without needing the SDXL model (`--model` points nowhere).
Adherence itself is not asserted (two images say little); the full run's numbers are in
benchmarks/RESULTS.md."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO_ROOT / "benchmarks"
SCRIPT = BENCHMARKS / "adherence.py"
RESULTS = BENCHMARKS / "RESULTS.md"
HEADING = "## Prompt adherence: kiln-flux-shapes (benchmarks/adherence.py --tables flux)"
PERCENT = r"\d{1,3}%"
ROW = re.compile(
    rf"^\| (default settings|guidance|steps) \| (?:Kiln FluxPipeline, torch|Kiln FluxPipeline, "
    rf"onnxruntime|diffusers FluxPipeline) \| FLOW_MATCH_EULER "
    rf"\| (\d+) \| ([\d.]+) \| ({PERCENT}) \| ({PERCENT}) \| ({PERCENT}) \| (\d+) \| [\d.]+ \|$"
)


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("adherence")
    finally:
        sys.path.remove(str(BENCHMARKS))


def run_flux_table(*flags: str) -> subprocess.CompletedProcess[str]:
    """benchmarks/adherence.py --tables flux with `flags`, as a user runs it."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--tables", "flux", *flags],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )


def test_flux_table_writes_its_section(tmp_path: Path) -> None:
    results = tmp_path / "results.md"
    before = RESULTS.read_text()
    done = run_flux_table(
        *("--prompts", "2", "--seeds", "1", "--results", str(results)),
        *("--model", str(tmp_path / "no-sdxl-model")),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert RESULTS.read_text() == before  # the section went to the file asked for
    section = results.read_text()
    assert HEADING in section
    assert "Command: `.venv/bin/python benchmarks/adherence.py --tables flux" in section
    rows = [ROW.match(line) for line in section.splitlines() if line.startswith("| ")]
    matched = [row.groups() for row in rows if row]
    assert len(matched) == len(rows) - 1  # every table line but the header
    settings = [(group, int(steps), float(guidance)) for group, steps, guidance, *_ in matched]
    assert settings == [
        *(("default settings", 4, 3.0) for _ in range(3)),
        *(("guidance", 4, value) for value in (1.0, 2.0, 3.0, 5.0)),
        *(("steps", value, 3.0) for value in (1, 2, 4, 8)),
    ]
    assert all(row[-1] == "2" for row in matched)  # images per row
    # The defaults on every runner: torch, onnxruntime (built graphs), diffusers.
    runners = [line.split(" | ")[1] for line in section.splitlines() if line.startswith("| def")]
    assert runners == [
        "Kiln FluxPipeline, torch",
        "Kiln FluxPipeline, onnxruntime",
        "diffusers FluxPipeline",
    ]
    assert re.search(
        r"^Bar \(issue 13\): both colours right in ≥ 90% of images at the model's defaults "
        r"\(4 steps, guidance 3, FLOW_MATCH_EULER\)\. \*\*(PASS|FAIL)\*\*: [\d.]+% of 2 images\.$",
        section,
        re.MULTILINE,
    )


def test_flux_verdict_fails_below_the_bar(bench: ModuleType) -> None:
    from kiln_training.evaluate import Adherence

    def verdict(colours: float) -> str:
        result = Adherence(images=10, colours=colours, shape=0.3, all_right=0.3)
        row = bench.Row("default settings", "r", "FLOW_MATCH_EULER", 4, 3.0, result, 1.0)
        return str(bench.flux_verdict(row))

    assert "**PASS**: 90.0% of 10 images" in verdict(0.9)
    assert "**FAIL**: 80.0% of 10 images" in verdict(0.8)


def test_bad_flux_model_names_the_flag(tmp_path: Path) -> None:
    done = run_flux_table("--flux-model", str(tmp_path))
    assert done.returncode == 2
    assert f"--flux-model {tmp_path} is not a model folder" in done.stderr
