"""SDXL and FLUX on one server: FLUX's cost per image and per step, and a mixed load.

    .venv/bin/python benchmarks/families.py [--sdxl kiln-shapes] [--flux kiln-tiny-flux-dev]
        [--clients 8] [--duration 20] [--results]

One `kiln serve` (torch backend) serves an SDXL model and a FLUX model (built-in names or
diffusers folders). Three phases, each a closed loop of `--clients` concurrent clients for
`--duration` seconds at each model's defaults:
1. FLUX alone (every client asks the FLUX model), 2. SDXL alone, 3. mixed: half the clients
ask each. Per family and phase: images per second, p50 / p95 latency, and from the
`completed` events the engine seconds per image and per denoising step (a request's share
of each batched call, as `kiln cost` reads them). The mixed phase shows what each family
keeps of its throughput and latency beside the other; the batcher gives each shape group
(model and size) its turn step by step, so neither starves.

The FLUX cost on other backends (onnxruntime, TensorRT) is not measured: FLUX is served
on torch only so far. `--results` writes the section to benchmarks/RESULTS.md
(`--results-file` elsewhere); otherwise it only prints.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from load import percentile
from results_file import RESULTS, cpu_name, write_section

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.proto.kiln.v1 import generation_service_pb2_grpc as pb_grpc
from kiln_server.local import start_local_server
from kiln_server.models.registry import BUILTIN_MODELS

SECTION = "## SDXL and FLUX on one server (benchmarks/families.py)"
PROMPTS = [
    "a red circle on a blue background",
    "a yellow triangle on a purple background",
    "a white square on a black background",
    "a green cross on an orange background",
]
FAMILIES = ("flux", "sdxl")


@dataclass
class FamilyRun:
    """One family's completed requests in one phase."""

    clients: int
    latencies: list[float] = field(default_factory=list)
    images: int = 0
    steps: int = 0
    engine_seconds: float = 0.0
    errors: int = 0


@dataclass
class Phase:
    """One phase: its name, wall seconds and each family's run."""

    name: str
    seconds: float
    runs: dict[str, FamilyRun]


def model_entry(name: str, model: str) -> str:
    """A [[models]] entry for a built-in name or a folder."""
    if model in BUILTIN_MODELS:
        return f'[[models]]\nname = "{name}"\nbuiltin = "{model}"\n'
    folder = Path(model).resolve()
    if not (folder / "model_index.json").is_file():
        raise SystemExit(f"{model} is neither a built-in model nor a diffusers model folder")
    return f'[[models]]\nname = "{name}"\npath = "{folder}"\n'


async def client_loop(
    stub: pb_grpc.GenerationServiceStub, model: str, run: FamilyRun, index: int, deadline: float
) -> None:
    """Send requests one after another until the deadline, recording each completed one."""
    sent = 0
    while time.monotonic() < deadline:
        request = pb.GenerateRequest(
            model=model, prompt=PROMPTS[(index + sent) % len(PROMPTS)], seed=index * 1000 + sent
        )
        sent += 1
        began = time.monotonic()
        steps = 0
        try:
            async for event in stub.Generate(request, timeout=600):
                if event.HasField("progress"):
                    steps = event.progress.total_steps
                if event.HasField("completed"):
                    run.latencies.append(time.monotonic() - began)
                    run.images += event.completed.num_images
                    run.engine_seconds += event.completed.engine_seconds
                    run.steps += steps
        except grpc.aio.AioRpcError:
            run.errors += 1


async def run_phase(address: str, name: str, clients: dict[str, int], seconds: float) -> Phase:
    """`clients[family]` closed-loop clients per family for `seconds`."""
    runs = {family: FamilyRun(count) for family, count in clients.items() if count}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        deadline = time.monotonic() + seconds
        began = time.monotonic()
        tasks = [
            client_loop(stub, family, runs[family], index, deadline)
            for family in runs
            for index in range(runs[family].clients)
        ]
        await asyncio.gather(*tasks)
        return Phase(name, time.monotonic() - began, runs)


def row(phase: Phase, family: str) -> str:
    """One Markdown table row: a family's numbers in a phase."""
    run = phase.runs[family]
    per_image = run.engine_seconds / run.images if run.images else 0.0
    per_step = run.engine_seconds / run.steps if run.steps else 0.0
    return (
        f"| {phase.name} | {family} | {run.clients} | {len(run.latencies)} | "
        f"{run.images / phase.seconds:.2f} | {percentile(run.latencies, 50):.3f} | "
        f"{percentile(run.latencies, 95):.3f} | {per_image * 1000:.1f} | "
        f"{per_step * 1000:.1f} | {run.errors} |"
    )


def report(phases: list[Phase], args: argparse.Namespace, command: str) -> str:
    """The Markdown section: machine, command, the table and the mixed phase's ratios."""
    load = os.getloadavg()[0]
    lines = [
        SECTION,
        "",
        f"Machine: {platform.machine()} ({cpu_name()}), {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; measured {dt.date.today().isoformat()}; 1-minute load "
        f"average {load:.1f} at the end.",
        f"Command: `{command}`",
        f"Models: SDXL `{args.sdxl}`, FLUX `{args.flux}`, each at its defaults, torch backend; "
        f"{args.clients} closed-loop clients per phase for {args.duration:g} s.",
        "",
        "| phase | family | clients | requests | images/s | p50 s | p95 s | engine ms/image "
        "| engine ms/step | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [row(phase, family) for phase in phases for family in FAMILIES if family in phase.runs]
    alone = {p.name: p for p in phases}
    mixed = alone["mixed"]
    lines.append("")
    for family in FAMILIES:
        solo = alone[f"{family} alone"].runs[family]
        both = mixed.runs[family]
        solo_rate = solo.images / alone[f"{family} alone"].seconds
        both_rate = both.images / mixed.seconds
        share = both_rate / solo_rate if solo_rate else 0.0
        lines.append(
            f"- {family}: in the mixed phase {both_rate:.2f} images/s with "
            f"{both.clients} clients against {solo_rate:.2f} with {solo.clients} alone "
            f"({share:.2f}x); p95 {percentile(both.latencies, 95):.3f} s against "
            f"{percentile(solo.latencies, 95):.3f} s."
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with bounds checked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdxl", default="kiln-shapes", help="built-in name or SDXL folder")
    parser.add_argument(
        "--flux",
        default=None,
        help="built-in name or FLUX folder (default: models/kiln-flux-shapes when present, "
        "else kiln-tiny-flux-dev)",
    )
    parser.add_argument("--clients", type=int, default=8, help="clients per phase (2-64)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per phase")
    parser.add_argument("--intra-op-threads", type=int, default=1)
    parser.add_argument("--results", action="store_true", help="write the RESULTS.md section")
    parser.add_argument("--results-file", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not 2 <= args.clients <= 64:
        parser.error("--clients must be between 2 and 64 (half of them ask each family)")
    if not 1 <= args.duration <= 3600:
        parser.error("--duration must be between 1 and 3600 seconds")
    if args.flux is None:
        shipped = Path(__file__).resolve().parents[1] / "models" / "kiln-flux-shapes"
        args.flux = str(shipped) if (shipped / "model_index.json").is_file() else None
        args.flux = args.flux or "kiln-tiny-flux-dev"
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the three phases against one server and print (or write) the section."""
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="kiln-families-"))
    config = workdir / "kiln.toml"
    config.write_text(
        '[server]\ndefault_model = "sdxl"\n'
        + model_entry("sdxl", args.sdxl)
        + model_entry("flux", args.flux)
    )
    server = start_local_server(
        workdir,
        *("--config", str(config), "--backend", "torch"),
        *("--intra-op-threads", str(args.intra_op_threads), "--max-queue", "256"),
        timeout=600,
    )
    half = args.clients // 2
    plan = [
        ("flux alone", {"flux": args.clients}),
        ("sdxl alone", {"sdxl": args.clients}),
        ("mixed", {"flux": half, "sdxl": args.clients - half}),
    ]
    phases = []
    try:
        for name, clients in plan:
            print(f"{name}: {sum(clients.values())} clients for {args.duration:g} s", flush=True)
            phases.append(asyncio.run(run_phase(server.address, name, clients, args.duration)))
    finally:
        server.terminate()
    command = "python benchmarks/families.py " + " ".join(sys.argv[1:] if argv is None else argv)
    section = report(phases, args, command.strip())
    print(section)
    if args.results:
        write_section(SECTION, section, args.results_file)
    failed = sum(run.errors for phase in phases for run in phase.runs.values())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
