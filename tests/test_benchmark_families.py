"""benchmarks/families.py keeps working: one server with an SDXL and a FLUX model, each
phase's table rows, and the mixed phase's summary. Speed is not asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "families.py"
HEADING = "## SDXL and FLUX on one server (benchmarks/families.py)"


def test_families_benchmark_reports_every_phase(tmp_path: Path, kiln_cache_dir: Path) -> None:
    results = tmp_path / "results.md"
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            *("--sdxl", "kiln-shapes", "--flux", "kiln-tiny-flux-dev"),
            *("--clients", "2", "--duration", "2", "--results"),
            *("--results-file", str(results)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT / "benchmarks",
        env={**os.environ, "KILN_CACHE_DIR": str(kiln_cache_dir)},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    section = results.read_text()
    assert HEADING in section
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    phases = [tuple(cell.strip() for cell in line.strip("|").split("|")[:3]) for line in rows[1:]]
    assert phases == [
        ("flux alone", "flux", "2"),
        ("sdxl alone", "sdxl", "2"),
        ("mixed", "flux", "1"),
        ("mixed", "sdxl", "1"),
    ]
    for line in rows[1:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        requests, images_per_second, errors = int(cells[3]), float(cells[4]), int(cells[9])
        assert requests >= 1 and images_per_second > 0 and errors == 0
    assert "- flux: in the mixed phase" in section and "- sdxl: in the mixed phase" in section


def test_bad_flags_name_the_flag() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--clients", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT / "benchmarks",
    )
    assert done.returncode == 2
    assert "--clients must be between 2 and 64" in done.stderr
