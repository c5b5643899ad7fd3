"""benchmarks/gpu.py stays runnable: its CPU smoke run reports every row, and without a GPU
it refuses in one line.

The GPU benchmark runs where no test can (a CUDA host, once per session), so these tests run
the same script end to end on the CPU (`--smoke`: the small model, a few steps) and check
that every part of its report came out measured or says why not. Speed is not asserted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "gpu.py"
RESULTS = REPO_ROOT / "benchmarks" / "RESULTS.md"
HEADING = "## GPU: diffusers vs Kiln on SDXL base's architecture (benchmarks/gpu.py)"
NUMBER = r"-?\d+(?:\.\d+)?(?:e-?\d+)?"


def run_script(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run the script as a user does, with every GPU hidden from torch."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )


def table_row(report: str, first_cell: str) -> list[str]:
    """The cells of the Markdown table row whose first cell is `first_cell`."""
    for line in report.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r} in:\n{report}")


def gpu_section(text: str) -> str:
    """The GPU section of a RESULTS.md text ('' when absent)."""
    start = text.find(HEADING)
    if start < 0:
        return ""
    end = text.find("\n## ", start + len(HEADING))
    return text[start:] if end < 0 else text[start:end]


def test_smoke_run_reports_every_row(
    tmp_path: Path, kiln_cache_dir: Path, tiny_model_path: Path
) -> None:
    results_before = RESULTS.read_text() if RESULTS.exists() else ""
    results_file = tmp_path / "gpu-smoke.md"
    done = run_script(
        "--smoke", "--cache-dir", str(kiln_cache_dir), "--results-file", str(results_file)
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = done.stdout
    assert report.startswith(HEADING)
    assert "Model `kiln-tiny-sdxl`" in report
    flops = re.search(rf"UNet FLOPs per iteration: ({NUMBER}) TFLOP", report)
    assert flops is not None and float(flops.group(1)) > 0

    # The diffusers comparison and Kiln's plain pipeline ran: time, it/s, TFLOP/s, warm-up.
    for label in ("diffusers StableDiffusionXLPipeline (eager, SDPA)", "Kiln torch, plain"):
        name, per_image, its, tflops, peak, warm_up, runs, status = table_row(report, label)
        assert status == "ok", f"{name}: {status}"
        assert float(per_image) > 0 and float(its) > 0 and float(warm_up) >= 0
        assert re.match(rf"{NUMBER} \(peak unknown\)", tflops), tflops
        assert peak == "-"  # no GPU memory on the CPU
        assert int(runs) >= 1
    # What needs a GPU says so instead of a number.
    assert table_row(report, "Kiln torch, CUDA graphs")[-1] == "skipped: needs CUDA"
    assert table_row(report, "Kiln torch, compile + CUDA graphs")[-1] == "skipped: needs CUDA"
    assert table_row(report, "Kiln torch, compile")[-1].startswith("skipped: --smoke")

    # The batcher at 1, 4 and 8 concurrent requests.
    for concurrency in ("1", "4", "8"):
        _, rate, ratio, mean_rows, waves, _, status = table_row(report, concurrency)
        assert status == "ok", f"batcher x{concurrency}: {status}"
        assert float(rate) > 0 and ratio.endswith("x") and int(waves) >= 1
        # Requests under guidance take 2 rows, and the server's default cap is 8 rows a
        # step (requests submitted together may still join a step or two apart).
        assert 2 <= float(mean_rows) <= min(2 * int(concurrency), 8)

    # The preview's cost per step, for each method the tiny model serves.
    for method in ("decoder", "latent_rgb"):
        _, alone, with_preview, extra, share, encode, status = table_row(report, method)
        assert status == "ok", f"preview {method}: {status}"
        assert float(alone) > 0 and float(with_preview) > 0 and float(encode) > 0
        assert re.fullmatch(NUMBER, extra) and re.fullmatch(rf"{NUMBER}%", share)

    # Each goal is reported: measured ones met or not met, the compiled one not measured.
    goals = report.split("### Goals (reported, not asserted)")[1].split("Timeline:")[0]
    lines = [line for line in goals.splitlines() if line.startswith("- ")]
    assert len(lines) == 4, goals
    assert re.search(r"diffusers' time per image: \*\*(met|not met)\*\*", lines[0])
    assert "**not measured** (no compiled variant ran)" in lines[1]
    assert re.search(r"images / s of one: \*\*(met|not met)\*\*", lines[2])
    assert "preview decoder at most 2% of a step" in lines[3]
    assert "**not applicable** on" in lines[3]  # a CPU smoke run

    # The section went to the file asked for, never to RESULTS.md.
    assert results_file.read_text().strip().endswith(report.strip())
    results_after = RESULTS.read_text() if RESULTS.exists() else ""
    assert gpu_section(results_after) == gpu_section(results_before)


def test_without_cuda_it_exits_2_with_one_line() -> None:
    done = run_script(timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "needs a CUDA GPU" in lines[0] and "--smoke" in lines[0]
