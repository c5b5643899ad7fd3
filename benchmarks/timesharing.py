"""Time-sharing between shapes: how long a short request of another shape waits behind a
long batch, with the batcher draining one shape group before the next (one group slot,
the old behaviour) and with groups taking turns step by step (the default).

    .venv/bin/python benchmarks/timesharing.py [--model models/kiln-shapes] [--repeats 3]

In-process, on the batcher and pipeline `kiln serve`'s engine core runs (torch backend,
`--threads` CPU threads). The long request is LONG_OUTPUTS images at the model's largest
size; the short one a single image at the model's default size with few steps, submitted
once the long one has run two steps. Reported: the short request's latency (submit to
images) alone and behind the long batch, as a multiple of alone; and the long request's
time alone and with the short one beside it, whose difference is what the switching cost
the long batch (it also includes the short request's own engine time, which the long
batch has to share either way). Medians over `--repeats` rounds.
`--write-results` replaces this benchmark's section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from results_file import cpu_name, publish

from kiln_server.batcher import Batcher, BatcherSettings, Job
from kiln_server.events import Failed, Finished, JobEvent, Progress
from kiln_server.pipeline.params import GenerationParams

SECTION = "## Time-sharing between shapes (benchmarks/timesharing.py)"
LONG_OUTPUTS = 4
LONG_STEPS = 20
SHORT_STEPS = 4
MODES = {"drain one group, then the next": 1, "groups take turns each step": 4}


@dataclass
class Timed:
    """A job's emit: when it ended, and a hook for its progress."""

    submitted: float = 0.0
    ended: float = 0.0
    steps: int = 0

    def __post_init__(self) -> None:
        self.done = threading.Event()
        self.step_seen = threading.Event()

    def __call__(self, event: JobEvent) -> None:
        if isinstance(event, Progress):
            self.steps = event.step
            if event.step >= 2:
                self.step_seen.set()
        if isinstance(event, Failed):
            raise RuntimeError(event.message)
        if isinstance(event, Finished):
            self.ended = time.perf_counter()
            self.done.set()

    @property
    def seconds(self) -> float:
        return self.ended - self.submitted


def submit(batcher: Batcher, name: str, params: GenerationParams) -> Timed:
    timed = Timed(submitted=time.perf_counter())
    batcher.submit(Job(request_id=name, params=params, emit=timed))
    return timed


def run_round(
    pipeline: object, long: GenerationParams | None, short: GenerationParams | None, groups: int
) -> tuple[float | None, float | None]:
    """(long seconds, short seconds) of one round; None for a request not sent."""
    batcher = Batcher(
        {long.model if long else short.model: pipeline},  # type: ignore[union-attr,dict-item]
        BatcherSettings(default_max_batch_rows=16, max_shape_groups=groups),
    )
    batcher.start()
    try:
        long_timed = submit(batcher, "long", long) if long else None
        if long_timed is not None:
            assert long_timed.step_seen.wait(600)
        short_timed = submit(batcher, "short", short) if short else None
        for timed in (long_timed, short_timed):
            if timed is not None:
                assert timed.done.wait(600)
    finally:
        batcher.stop()
    return (
        long_timed.seconds if long_timed else None,
        short_timed.seconds if short_timed else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/kiln-shapes"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from kiln_server.engines.torch_engine import load_torch_engines
    from kiln_server.models.loader import load_modules, read_model_files
    from kiln_server.pipeline.sdxl import SDXLPipeline

    files = read_model_files(args.model)
    pipeline = SDXLPipeline(files, load_torch_engines(load_modules(args.model), files.dims))
    config = files.kiln_config
    name = args.model.name
    largest = int(config.get("max_size", 256))
    default = int(config.get("default_width", 64))
    guidance = float(config.get("default_guidance_scale", 5.0))
    long = GenerationParams(
        prompt="a red circle on a blue background",
        width=largest,
        height=largest,
        num_outputs=LONG_OUTPUTS,
        num_inference_steps=LONG_STEPS,
        guidance_scale=guidance,
        model=name,
    )
    short = replace(
        long,
        prompt="a yellow triangle on a purple background",
        width=default,
        height=default,
        num_outputs=1,
        num_inference_steps=SHORT_STEPS,
        seed=7,
    )
    run_round(pipeline, None, short, 1)  # warm-up
    alone_short = statistics.median(
        run_round(pipeline, None, short, 1)[1] or 0 for _ in range(args.repeats)
    )
    alone_long = statistics.median(
        run_round(pipeline, long, None, 1)[0] or 0 for _ in range(args.repeats)
    )
    rows = []
    for label, groups in MODES.items():
        rounds = [run_round(pipeline, long, short, groups) for _ in range(args.repeats)]
        long_s = statistics.median(r[0] or 0 for r in rounds)
        short_s = statistics.median(r[1] or 0 for r in rounds)
        rows.append(
            f"| {label} | {short_s:.3f} | {short_s / alone_short:.1f}x | {long_s:.2f} | "
            f"{100 * (long_s / alone_long - 1):+.1f}% |"
        )
    section = "\n".join(
        [
            SECTION,
            "",
            f"Machine: {platform.machine()}, {cpu_name()}, torch {torch.__version__}, "
            f"{args.threads} thread(s); measured {time.strftime('%Y-%m-%d')}.",
            f"Command: `.venv/bin/python benchmarks/timesharing.py --model {args.model} "
            f"--repeats {args.repeats} --threads {args.threads}`",
            f"Model `{name}` on torch. Long request: {LONG_OUTPUTS} images of "
            f"{largest}x{largest}, {LONG_STEPS} steps; short request: 1 image of "
            f"{default}x{default}, {SHORT_STEPS} steps, sent after the long one's second "
            f"step. Alone: short {alone_short:.3f} s, long {alone_long:.2f} s (medians of "
            f"{args.repeats}).",
            "",
            "| batcher | short request s | vs alone | long request s | long vs alone |",
            "|---|---:|---:|---:|---:|",
            *rows,
            "",
            "The long request's extra time includes the short request's own engine time, "
            "which it shares in either mode; the difference between the rows is the cost of "
            "switching shapes every step.",
        ]
    )
    publish(SECTION, section, args.write_results)


if __name__ == "__main__":
    main()
