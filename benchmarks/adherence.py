"""Prompt adherence of Kiln's shapes model: does the image show what the prompt says?

    .venv/bin/python benchmarks/adherence.py [--model models/kiln-shapes] [--threads 2]

Generates a fixed set of prompts (default 48 prompts × 2 seeds) and judges every image
from its pixels with kiln_training.evaluate: both colours right (shape and background) and
shape class right. Rows: the model's default settings, the same without guidance
(guidance 1.0), and every supported scheduler at its usual step count. The table is written
into the "Prompt adherence" section of benchmarks/RESULTS.md (other sections are kept).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))

from kiln_training.dataset import caption, prompt_set  # noqa: E402
from kiln_training.evaluate import Adherence, adherence, score  # noqa: E402
from kiln_training.sampling import SCHEDULERS, Sampler  # noqa: E402

BEGIN = "<!-- BEGIN adherence (benchmarks/adherence.py) -->"
END = "<!-- END adherence -->"

# Usual step counts per scheduler (Replicate names), as commonly used with SDXL.
USUAL_STEPS: dict[str, int] = {
    "K_EULER": 20,
    "K_EULER_ANCESTRAL": 30,
    "DDIM": 50,
    "DPMSolverMultistep": 25,
    "KarrasDPM": 25,
    "HeunDiscrete": 25,
    "PNDM": 50,
}


@dataclass
class Row:
    """One measured configuration."""

    label: str
    scheduler: str
    steps: int
    guidance: float
    result: Adherence
    seconds: float


def measure(
    sampler: Sampler,
    prompts: int,
    seeds: int,
    *,
    label: str,
    scheduler: str,
    steps: int,
    guidance: float,
    batch: int,
) -> Row:
    """Generate prompts × seeds images with the given settings and judge them."""
    scenes = prompt_set(prompts)
    jobs = [(scene, 1000 * (k + 1) + i) for k in range(seeds) for i, scene in enumerate(scenes)]
    scores = []
    began = time.perf_counter()
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        images = sampler.generate(
            [caption(scene) for scene, _ in chunk],
            [seed for _, seed in chunk],
            steps=steps,
            guidance_scale=guidance,
            scheduler=scheduler,
        )
        scores.extend(score(image, scene) for image, (scene, _) in zip(images, chunk, strict=True))
    result = adherence(scores)
    row = Row(label, scheduler, steps, guidance, result, time.perf_counter() - began)
    print(
        f"{label:<28} {scheduler:<20} steps {steps:>3} guidance {guidance:>4}: "
        f"colours {result.colours:.1%} shape {result.shape:.1%} all {result.all_right:.1%} "
        f"({row.seconds:.0f} s)",
        flush=True,
    )
    return row


def render_section(rows: list[Row], args: argparse.Namespace, model: Path) -> str:
    """The Markdown section holding the table and how it was produced."""
    config = Sampler.__module__  # the sampler used (diffusers reference pipeline)
    lines = [
        BEGIN,
        "## Prompt adherence (kiln-shapes)",
        "",
        f"Model `{model.relative_to(REPO) if model.is_relative_to(REPO) else model}`, "
        f"{args.prompts} prompts × {args.seeds} seeds = {args.prompts * args.seeds} images "
        "per row, 64×64, judged from pixels by `kiln_training.evaluate` "
        "(background colour, shape colour, shape class).",
        f"Sampler: `{config}` (diffusers StableDiffusionXLPipeline, torch, float32, CPU, "
        f"{args.threads} threads). Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on "
        f"{platform.machine()} with {os.cpu_count()} cores.",
        "",
        "Command: `.venv/bin/python benchmarks/adherence.py"
        + (f" --prompts {args.prompts}" if args.prompts != 48 else "")
        + (f" --seeds {args.seeds}" if args.seeds != 2 else "")
        + "`",
        "",
        "| setting | scheduler | steps | guidance | both colours right | shape right "
        "| all right | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.label} | {row.scheduler} | {row.steps} | {row.guidance:g} | "
            f"{row.result.row()} | {row.seconds:.0f} |"
        )
    lines += [
        "",
        "Bar (issue 5): at default settings both colours right ≥ 90% and shape right ≥ 70%; "
        "guidance 1.0 must score measurably lower.",
        END,
    ]
    return "\n".join(lines) + "\n"


def write_section(results: Path, section: str) -> None:
    """Replace this benchmark's section in RESULTS.md, or append it; keep everything else."""
    text = results.read_text() if results.is_file() else "# Kiln benchmark results\n"
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(text)


def main(argv: list[str] | None = None) -> int:
    """Run the table and write it to RESULTS.md (unless --no-write)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "kiln-shapes")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=48, help="images per pipeline call")
    parser.add_argument(
        "--schedulers", default=",".join(SCHEDULERS), help="comma-separated Replicate names"
    )
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.prompts < 1 or args.seeds < 1:
        parser.error("--prompts and --seeds must be at least 1")
    unknown = [s for s in args.schedulers.split(",") if s not in SCHEDULERS]
    if unknown:
        parser.error(f"unknown scheduler(s) {', '.join(unknown)}; known: {', '.join(SCHEDULERS)}")
    torch.set_num_threads(args.threads)
    sampler = Sampler(args.model)
    defaults = sampler.defaults
    default_scheduler = str(defaults["default_scheduler"])
    default_steps = int(defaults["default_num_inference_steps"])
    default_guidance = float(defaults["default_guidance_scale"])
    common = {"batch": args.batch}
    rows = [
        measure(
            sampler,
            args.prompts,
            args.seeds,
            label="default settings",
            scheduler=default_scheduler,
            steps=default_steps,
            guidance=default_guidance,
            **common,
        ),
        measure(
            sampler,
            args.prompts,
            args.seeds,
            label="no guidance",
            scheduler=default_scheduler,
            steps=default_steps,
            guidance=1.0,
            **common,
        ),
    ]
    for name in args.schedulers.split(","):
        rows.append(
            measure(
                sampler,
                args.prompts,
                args.seeds,
                label="scheduler at usual steps",
                scheduler=name,
                steps=USUAL_STEPS[name],
                guidance=default_guidance,
                **common,
            )
        )
    if not args.no_write:
        write_section(args.results, render_section(rows, args, args.model.resolve()))
        print(f"wrote the adherence section of {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
