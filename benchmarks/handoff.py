"""How long a finished request holds the batch: the engine thread's time from the end of the
request's last denoising step until it starts the batch's next step.

    .venv/bin/python benchmarks/handoff.py [--size 1024] [--outputs 4] [--repeats 3]

Starts the real engine core process through EngineCoreClient, as `kiln serve` does, with
kiln-tiny-sdxl (random weights) at SIZExSIZE; inside the core, the pipeline's
`denoise_step` and `decode` are wrapped to time the engine thread, and nothing else
changes. Each round submits a companion request (one image, several steps) and the
measured request (OUTPUTS images, one step, guidance 1) together: the measured request
finishes while the companion keeps the batch going, and the gap between the two steps is
how long the finished request held the batch. The VAE decode is part of that gap (it runs
on the engine, before and after); the rest is the hand-off: previews, moving the images to
the host and out of the core. This side does what the API process does with the images
(PNG-encodes each, off the event loop). Rounds alternate between no previews and a
preview every step.

The script only uses interfaces older checkouts have too, so it measures them as well:
point PYTHONPATH at another checkout's server/, clients/python and build_engines/ (the
core process inherits it), and `--save` its numbers for a later `--baseline`.
`--write-results` replaces this benchmark's section of benchmarks/RESULTS.md with this
run's numbers and the baseline's.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SECTION = "## Finished-request hand-off on the engine thread (benchmarks/handoff.py)"
MODEL = "kiln-tiny-sdxl"
TIMINGS_ENV = "KILN_HANDOFF_TIMINGS"
COMPANION_STEPS = 4
COMPANION_SEED_OFFSET = 50
VARIANTS = ("no previews", "preview every step")


# ----- inside the engine core process -----


def run_core(argv: list[str]) -> None:
    """The engine core (`handoff.py --core FD PARENT_PID`), with its engine thread timed."""
    from kiln_server.core import process
    from kiln_server.pipeline.sdxl import SDXLPipeline

    out = open(os.environ[TIMINGS_ENV], "a", buffering=1)  # noqa: SIM115 (lives as the process)
    lock = threading.Lock()

    def record(**fields: Any) -> None:
        with lock:
            out.write(json.dumps(fields) + "\n")

    denoise_step, decode = SDXLPipeline.denoise_step, SDXLPipeline.decode

    def timed_step(self: Any, states: list[Any]) -> Any:
        start = time.perf_counter()
        result = denoise_step(self, states)
        end = time.perf_counter()
        finished = [state.params.seed for state in states if state.finished]
        record(
            kind="step",
            start=start,
            end=end,
            seeds=[s.params.seed for s in states],
            finished=finished,
        )
        return result

    def timed_decode(self: Any, state: Any) -> Any:
        start = time.perf_counter()
        result = decode(self, state)
        record(kind="decode", start=start, end=time.perf_counter(), seed=state.params.seed)
        return result

    SDXLPipeline.denoise_step = timed_step
    SDXLPipeline.decode = timed_decode
    process.main(argv)


class _CoreLauncher:
    """Stands in for the subprocess module inside kiln_server.core.client: starts this
    script's `--core` mode where the client would start `-m kiln_server.core.process`."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        module = args.index("kiln_server.core.process")
        args = [*args[: module - 1], str(Path(__file__).resolve()), "--core", *args[module + 1 :]]
        return subprocess.Popen(args, **kwargs)


# ----- the API side -----


def read_timings(path: Path) -> list[dict[str, Any]]:
    """Every record the core wrote so far."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def round_result(records: list[dict[str, Any]], seed: int) -> dict[str, float] | None:
    """Seconds the request with `seed` held the batch, its decode, and the batch's plain
    step-to-step gaps; None when no step followed it (it joined the companion's last)."""
    ours = {seed, seed + COMPANION_SEED_OFFSET}
    steps = sorted(
        (r for r in records if r["kind"] == "step" and ours & set(r["seeds"])),
        key=lambda r: r["start"],
    )
    last = next((i for i, r in enumerate(steps) if seed in r["finished"]), None)
    if last is None or last + 1 >= len(steps):
        return None
    hold = steps[last + 1]["start"] - steps[last]["end"]
    (decode,) = [
        r["end"] - r["start"] for r in records if r["kind"] == "decode" and r["seed"] == seed
    ]
    plain = [
        after["start"] - before["end"]
        for before, after in itertools.pairwise(steps)
        if not before["finished"]
    ]
    return {
        "hold": hold,
        "decode": decode,
        "handoff": hold - decode,
        "plain_gap": min(plain, default=0.0),
    }


async def run_round(
    client: Any, spec: Any, index: int, outputs: int, preview_every: int, encode: Any
) -> int:
    """One round; returns the measured request's seed."""
    from kiln_server.events import Decoded, Failed, Finished
    from kiln_server.pipeline.params import PreviewParams

    loop = asyncio.get_running_loop()
    seed = 10_000 + index * 100
    companion = spec.default_request(
        "a lighthouse",
        seed=seed + COMPANION_SEED_OFFSET,
        num_outputs=1,
        num_inference_steps=COMPANION_STEPS,
        guidance_scale=1.0,
    )
    measured = spec.default_request(
        "a teapot",
        seed=seed,
        num_outputs=outputs,
        num_inference_steps=1,
        guidance_scale=1.0,
        preview=PreviewParams(every_n_steps=preview_every),
    )
    ends: list[asyncio.Future[None]] = []
    encodings: list[asyncio.Future[Any]] = []

    def listener(params: Any) -> Any:
        done: asyncio.Future[None] = loop.create_future()
        ends.append(done)

        async def encode_all(pixels: Any) -> None:
            for image, image_seed in zip(pixels, params.seeds, strict=True):
                await asyncio.to_thread(encode, image, "png", 90, {"seed": image_seed})

        def encode_later(pixels: Any) -> None:
            encodings.append(asyncio.ensure_future(encode_all(pixels)))

        def on_event(event: Any) -> None:
            # As the service does: the event goes to the event loop, which encodes the
            # images one after the other on a worker thread.
            if isinstance(event, Decoded):
                loop.call_soon_threadsafe(encode_later, event.pixels)
            elif isinstance(event, Finished | Failed):
                loop.call_soon_threadsafe(done.set_result, None)
                if isinstance(event, Failed):
                    print(f"request failed: {event.message}", file=sys.stderr)

        return on_event

    client.submit(f"companion-{index}", companion, listener(companion))
    client.submit(f"measured-{index}", measured, listener(measured))
    await asyncio.gather(*ends)
    await asyncio.gather(*encodings)
    return seed


async def measure(args: argparse.Namespace, timings: Path) -> dict[str, list[dict[str, float]]]:
    """Start a core, run the rounds, stop it; per variant, each usable round's result."""
    from kiln_server.core import client as client_module
    from kiln_server.imaging import encode_image
    from kiln_server.models.registry import (
        ModelRegistry,
        builtin_model_path,
        default_cache_dir,
        make_spec,
    )
    from kiln_server.settings import ServerSettings

    path = builtin_model_path(MODEL, default_cache_dir())
    overrides = {"max_size": args.size, "default_width": args.size, "default_height": args.size}
    spec = make_spec(MODEL, path, overrides)
    settings = ServerSettings(backend=args.backend, log_level="WARNING", max_batch_rows=16)
    client_module.subprocess = _CoreLauncher()
    os.environ[TIMINGS_ENV] = str(timings)
    client = client_module.EngineCoreClient(settings, ModelRegistry({MODEL: spec}, MODEL))
    client.start()
    results: dict[str, list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
    try:
        await client.ready()
        index = 0
        for _ in range(args.repeats):
            for variant in VARIANTS:
                for _attempt in range(3):
                    index += 1
                    preview_every = 1 if variant == VARIANTS[1] else 0
                    seed = await run_round(
                        client, spec, index, args.outputs, preview_every, encode_image
                    )
                    result = round_result(read_timings(timings), seed)
                    if result is not None:
                        results[variant].append(result)
                        print(
                            variant, {k: round(v * 1000, 1) for k, v in result.items()}, flush=True
                        )
                        break
    finally:
        await client.stop()
    return results


def summarize(label: str, results: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Medians per variant in milliseconds, and what produced them."""
    import kiln_server

    pythonpath = os.environ.get("PYTHONPATH")
    prefix = f"PYTHONPATH={pythonpath} " if pythonpath else ""
    arguments = " ".join(f'"{a}"' if " " in a else a for a in sys.argv[1:])
    return {
        "label": label,
        "command": f"{prefix}.venv/bin/python benchmarks/handoff.py {arguments}",
        "code": str(Path(kiln_server.__file__).parent),
        "date": time.strftime("%Y-%m-%d"),
        "variants": {
            variant: {
                key: statistics.median(r[key] for r in rounds) * 1000
                for key in ("hold", "decode", "handoff", "plain_gap")
            }
            | {"rounds": len(rounds)}
            for variant, rounds in results.items()
            if rounds
        },
    }


def table(summaries: list[dict[str, Any]]) -> list[str]:
    """One row per code version and variant."""
    lines = [
        "| code | request | holds the batch ms | of which VAE decode ms | hand-off ms "
        "| plain step gap ms | rounds |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for summary in summaries:
        for variant, m in summary["variants"].items():
            lines.append(
                f"| {summary['label']} | {variant} | {m['hold']:.1f} | {m['decode']:.1f} "
                f"| {m['handoff']:.1f} | {m['plain_gap']:.2f} | {m['rounds']} |"
            )
    return lines


def main() -> int:
    """Parse flags, measure, print, save and optionally record the report."""
    if sys.argv[1:2] == ["--core"]:
        run_core(sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="width and height")
    parser.add_argument("--outputs", type=int, default=4, help="images of the measured request")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per variant")
    parser.add_argument("--backend", default="torch", choices=("torch", "onnxruntime"))
    parser.add_argument("--label", default="this checkout", help="names this code in the table")
    parser.add_argument("--save", type=Path, help="write this run's medians to a JSON file")
    parser.add_argument("--baseline", type=Path, help="a --save file to show beside this run")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        timings = Path(folder) / "timings.jsonl"
        timings.touch()
        results = asyncio.run(measure(args, timings))
    summary = summarize(args.label, results)
    if args.save:
        args.save.write_text(json.dumps(summary, indent=1))
    summaries = [json.loads(args.baseline.read_text())] if args.baseline else []
    summaries.append(summary)
    section = "\n".join(
        [
            SECTION,
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}.",
            f"Model `{MODEL}` on `{args.backend}` at {args.size}x{args.size}: a request of "
            f"{args.outputs} images (1 step, guidance 1) finishing beside a 1-image "
            f"{COMPANION_STEPS}-step companion, through the real engine core process; "
            f"medians of the rounds. Holds the batch: the engine thread's time from the end "
            f"of the request's last step to the start of the companion's next. Hand-off: "
            f"that time less the VAE decode. Plain step gap: the fastest gap between two "
            f"steps where nothing finished.",
            "",
            *table(summaries),
            "",
            "On the CPU the VAE decode (engine work, on the engine thread in every "
            "version) dominates and swings by seconds with the machine's load; the hand-off "
            "column is what moving results off the engine thread changes. It includes the "
            "step's progress events and, with previews, the preview's latent-to-RGB map "
            "(engine work too).",
            "",
            "Commands (each run imports kiln_server from the folder named; an older commit "
            "runs from `git worktree add /tmp/kiln-before COMMIT`):",
            "",
            *(f"- {s['label']}, {s['date']}: `{s['command']}` ({s['code']})" for s in summaries),
            "",
        ]
    )
    from results_file import publish

    publish(SECTION, section, args.write_results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
