"""The image-conditioning benchmarks keep working: the cost script reports every kind of
request, and the inpainting cases of benchmarks/adherence.py keep the product's pixels.

Speed is not asserted. The cost script runs as a user runs it (a subprocess) on the shipped
kiln-shapes model with few steps and one round, writing to a temporary results file; the
inpainting check runs a handful of the adherence benchmark's cases the server's way.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "image_conditioning.py"
RESULTS = REPO_ROOT / "benchmarks" / "RESULTS.md"
SHIPPED_MODEL = REPO_ROOT / "models" / "kiln-shapes"
HEADING = (
    "## Image conditioning: cost per image against text-to-image (benchmarks/image_conditioning.py)"
)
NUMBER = r"\d+(?:\.\d+)?"


def table_rows(report: str) -> dict[str, list[str]]:
    """Cells of every Markdown table row, keyed by the first cell."""
    rows = {}
    for line in report.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_cost_script_reports_every_kind_of_request(tmp_path: Path) -> None:
    results_before = RESULTS.read_text() if RESULTS.exists() else ""
    results_file = tmp_path / "results.md"
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            *("--models", "kiln-shapes", "--backends", "torch", "--steps", "4"),
            *("--repeats", "1", "--threads", "1", "--write-results"),
            *("--results-file", str(results_file)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = done.stdout
    assert report.startswith(HEADING)
    assert "**kiln-shapes, torch, 64x64**, 4 steps" in report
    rows = table_rows(report)
    # int(steps x strength) UNet steps; text-to-image runs them all and encodes no photo.
    expected_steps = {
        "text-to-image": 4,
        "img2img 0.3": 1,
        "img2img 0.6": 2,
        "img2img 1": 4,
        "inpainting 0.8": 3,
        "inpainting 1": 4,
    }
    for name, steps in expected_steps.items():
        _, unet_steps, per_image, ratio, prepare, encoder, share, stepping, decode = rows[name]
        assert int(unet_steps) == steps, name
        assert float(per_image) > 0 and float(prepare) > 0 and float(decode) > 0
        assert re.fullmatch(rf"{NUMBER}x", ratio) and float(stepping) >= 0
        if name == "text-to-image":
            assert ratio == "1.00x" and float(encoder) == 0 and share == "-"
        else:
            assert float(encoder) > 0 and re.fullmatch(rf"{NUMBER}%", share), name
    # The section went to the file asked for, never to RESULTS.md.
    assert results_file.read_text().strip().endswith(report.strip())
    assert (RESULTS.read_text() if RESULTS.exists() else "") == results_before


def test_inpainting_cases_keep_the_product_and_change_the_background() -> None:
    from kiln_training import image_tasks
    from kiln_training.sampling import KilnSampler

    sampler = KilnSampler(SHIPPED_MODEL, "torch")
    photos, _ = image_tasks.source_photos(sampler.generate, prompts=4, seeds=1)
    cases = image_tasks.inpainting_cases(photos)
    for case in cases:
        assert case.mask is not None
        assert case.scene.background != case.photo.scene.background
        assert case.scene.colour == case.photo.scene.colour
        # The product (kept) is the shape and its rim; everything else is repainted.
        assert 0.05 < (case.mask == 0).mean() < 0.7
    scores = image_tasks.run_inpainting(sampler.run, cases, 0.8, sampler.defaults)
    result = image_tasks.inpainting_result(scores)
    # keep_unmasked (the server's default with a mask): the kept pixels are the photo's.
    assert result.kept_max == 0 and result.kept_exact == 1.0
    # Without the overlay the decoder's output differs from the photo there.
    assert result.kept_max_raw > 0
    assert result.background_right >= 0.75, result
