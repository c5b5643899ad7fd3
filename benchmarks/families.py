"""SDXL and FLUX on one server: FLUX's cost per image and per step on each backend, and a
mixed load.

    .venv/bin/python benchmarks/families.py [--sdxl kiln-shapes] [--flux kiln-flux-shapes]
        [--backends torch,onnxruntime] [--clients 8] [--duration 20] [--results]

Each phase is a closed loop of `--clients` concurrent clients for `--duration` seconds at
each model's defaults (by default the shipped models: kiln-shapes, and kiln-flux-shapes at
64x64, 4 steps, true CFG). Per family and phase: images per second, p50 / p95 latency,
and from the `completed` events the engine seconds per image and per denoising step (a
request's share of each batched call, as `kiln cost` reads them).

- torch: one `kiln serve --backend torch` serves the SDXL and the FLUX model (built-in
  names or diffusers folders) for three phases: 1. FLUX alone (every client asks the FLUX
  model), 2. SDXL alone, 3. mixed: half the clients ask each. The mixed phase shows what
  each family keeps of its throughput and latency beside the other; the batcher gives each
  shape group (model and size) its turn step by step, so neither starves.
- onnxruntime: the FLUX model's ONNX graphs are built into a temporary engines root (the
  `kiln build-engines` path; its seconds are reported), and `kiln serve --engines ROOT`
  serves the model from them for a FLUX-alone phase. Each server's ListModels must report
  the expected backend for every model, or the benchmark stops.
- TensorRT cannot run on a machine without TensorRT and an NVIDIA GPU: its row says so.

`--results` writes the section to benchmarks/RESULTS.md (`--results-file` elsewhere);
otherwise it only prints.
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
from importlib.metadata import version
from pathlib import Path

import grpc
from load import percentile
from results_file import RESULTS, cpu_name, write_section

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.proto.kiln.v1 import generation_service_pb2_grpc as pb_grpc
from kiln_server.local import LocalServer, start_local_server
from kiln_server.models.registry import BUILTIN_MODELS, builtin_model_path, default_cache_dir

SECTION = "## SDXL and FLUX on one server (benchmarks/families.py)"
PROMPTS = [
    "a red circle on a blue background",
    "a yellow triangle on a purple background",
    "a white square on a black background",
    "a green cross on an orange background",
]
FAMILIES = ("flux", "sdxl")
BACKENDS = ("torch", "onnxruntime")
# Backends whose FLUX cost this machine cannot measure, and why (a row of the table).
NOT_MEASURED = {"tensorrt": "not measured: needs TensorRT and an NVIDIA GPU"}


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
    """One phase: its name, backend, wall seconds and each family's run."""

    name: str
    backend: str
    seconds: float
    runs: dict[str, FamilyRun]

    def rate(self, family: str) -> float:
        """The family's images per wall second."""
        return self.runs[family].images / self.seconds


@dataclass
class Build:
    """The FLUX model's ONNX build: wall seconds, its stages and the graphs' size."""

    seconds: float
    export_seconds: float
    validate_seconds: float
    bytes: int


def model_folder(model: str) -> Path:
    """The diffusers folder of a built-in name (generated into the cache) or a folder."""
    if model in BUILTIN_MODELS:
        return builtin_model_path(model, default_cache_dir())
    folder = Path(model).resolve()
    if not (folder / "model_index.json").is_file():
        raise SystemExit(f"{model} is neither a built-in model nor a diffusers model folder")
    return folder


def write_config(path: Path, models: dict[str, str]) -> Path:
    """A kiln.toml at `path` serving each `name = model` (built-in name or folder)."""
    entries = [
        f'[[models]]\nname = "{name}"\n'
        + (
            f'builtin = "{model}"\n'
            if model in BUILTIN_MODELS
            else f'path = "{model_folder(model)}"\n'
        )
        for name, model in models.items()
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[server]\ndefault_model = "{next(iter(models))}"\n' + "".join(entries))
    return path


def build_flux_engines(args: argparse.Namespace, root: Path) -> Build:
    """Export and validate the FLUX model's ONNX graphs into root/flux (`kiln build-engines`)."""
    from kiln_build.build import BuildOptions, run_build

    began = time.perf_counter()
    summary = run_build(
        BuildOptions(model_folder(args.flux), root / "flux", "onnx", "flux", progress=False),
        say=lambda text: None,
    )
    return Build(
        time.perf_counter() - began,
        summary.export_seconds,
        summary.validate_seconds,
        sum(summary.file_sizes.values()),
    )


def serve(
    workdir: Path, args: argparse.Namespace, models: dict[str, str], *flags: str
) -> LocalServer:
    """A `kiln serve` in `workdir` serving `models`, SERVING."""
    config = write_config(workdir / "kiln.toml", models)
    return start_local_server(
        workdir,
        *("--config", str(config), "--max-queue", "256", *flags),
        *("--intra-op-threads", str(args.intra_op_threads)),
        timeout=600,
    )


def check_and_warm(server: LocalServer, backends: dict[str, str]) -> None:
    """Stop unless ListModels reports `backends[name]` for each model; then one request
    per model, so no phase pays a first call's cost."""
    with server.channel() as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=60).models}
        for name, backend in backends.items():
            if models[name].backend != backend:
                raise SystemExit(
                    f"model {name!r} is served on {models[name].backend!r}, not {backend!r}: "
                    f"{models[name].backend_reason}"
                )
            for _ in stub.Generate(pb.GenerateRequest(model=name, prompt=PROMPTS[0]), timeout=600):
                pass


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


async def run_phase(
    address: str, name: str, backend: str, clients: dict[str, int], seconds: float
) -> Phase:
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
        return Phase(name, backend, time.monotonic() - began, runs)


def run_server(
    workdir: Path,
    args: argparse.Namespace,
    backend: str,
    plan: list[tuple[str, dict[str, int]]],
    *flags: str,
) -> list[Phase]:
    """Start a server for the plan's families, check each is on `backend`, run the plan."""
    families = [family for family in FAMILIES if any(family in clients for _, clients in plan)]
    models = {"flux": args.flux, "sdxl": args.sdxl}
    server = serve(workdir, args, {family: models[family] for family in families}, *flags)
    phases = []
    try:
        check_and_warm(server, dict.fromkeys(families, backend))
        for name, clients in plan:
            print(
                f"{name} ({backend}): {sum(clients.values())} clients for {args.duration:g} s",
                flush=True,
            )
            phases.append(
                asyncio.run(run_phase(server.address, name, backend, clients, args.duration))
            )
    finally:
        server.terminate()
    return phases


def row(phase: Phase, family: str) -> str:
    """One Markdown table row: a family's numbers in a phase."""
    run = phase.runs[family]
    per_image, per_step = engine_ms(run)
    return (
        f"| {phase.name} | {family} | {phase.backend} | {run.clients} | {len(run.latencies)} | "
        f"{phase.rate(family):.2f} | {percentile(run.latencies, 50):.3f} | "
        f"{percentile(run.latencies, 95):.3f} | {per_image:.1f} | "
        f"{per_step:.1f} | {run.errors} |"
    )


def engine_ms(run: FamilyRun) -> tuple[float, float]:
    """Engine milliseconds per image and per step."""
    return (
        run.engine_seconds / run.images * 1000 if run.images else 0.0,
        run.engine_seconds / run.steps * 1000 if run.steps else 0.0,
    )


def backend_lines(phases: dict[tuple[str, str], Phase], build: Build | None) -> list[str]:
    """The ONNX build, and FLUX on onnxruntime against torch."""
    lines = []
    if build is not None:
        lines.append(
            f"- FLUX ONNX build (`kiln build-engines`: export and cleanup "
            f"{build.export_seconds:.1f} s, validation against torch "
            f"{build.validate_seconds:.1f} s): {build.seconds:.1f} s, "
            f"{build.bytes / 2**20:.1f} MiB of graphs."
        )
    torch_run = phases.get(("flux alone", "torch"))
    onnx_run = phases.get(("flux alone", "onnxruntime"))
    if torch_run and onnx_run:
        ours, theirs = engine_ms(onnx_run.runs["flux"]), engine_ms(torch_run.runs["flux"])
        lines.append(
            f"- flux on onnxruntime: {onnx_run.rate('flux'):.2f} images/s against "
            f"{torch_run.rate('flux'):.2f} on torch; engine {ours[0]:.1f} ms/image and "
            f"{ours[1]:.1f} ms/step against {theirs[0]:.1f} and {theirs[1]:.1f} "
            f"({theirs[0] / ours[0] if ours[0] else 0.0:.2f}x per image)."
        )
    return lines


def mixed_lines(phases: dict[tuple[str, str], Phase]) -> list[str]:
    """Each family in the mixed phase against alone (torch)."""
    mixed = phases.get(("mixed", "torch"))
    if mixed is None:
        return []
    lines, shares = [], []
    for family in FAMILIES:
        alone = phases[(f"{family} alone", "torch")]
        solo, both = alone.runs[family], mixed.runs[family]
        share = mixed.rate(family) / alone.rate(family) if alone.rate(family) else 0.0
        shares.append(share)
        lines.append(
            f"- {family}: in the mixed phase {mixed.rate(family):.2f} images/s with "
            f"{both.clients} clients against {alone.rate(family):.2f} with {solo.clients} "
            f"alone ({share:.2f}x); p95 {percentile(both.latencies, 95):.3f} s against "
            f"{percentile(solo.latencies, 95):.3f} s."
        )
    lines.append(
        f"- together the mixed phase's shares add to {sum(shares):.2f} (1.00: the server's "
        "throughput split between the families without loss)."
    )
    return lines


def report(
    phases: list[Phase],
    build: Build | None,
    args: argparse.Namespace,
    command: str,
    loads: tuple[float, float],
) -> str:
    """The Markdown section: machine, command, the table, the backends and the mixed phase."""
    lines = [
        SECTION,
        "",
        f"Machine: {platform.machine()} ({cpu_name()}), {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {version('torch')}, onnxruntime "
        f"{version('onnxruntime')}; measured {dt.date.today().isoformat()}; 1-minute load "
        f"average {loads[0]:.2f} before the run, {loads[1]:.2f} after it (its own servers "
        "and clients included).",
        f"Command: `{command}`",
        f"Models: SDXL `{args.sdxl}`, FLUX `{args.flux}`, each at its defaults; "
        f"{args.clients} closed-loop clients per phase for {args.duration:g} s, after one "
        "warm-up request per model. Engine ms are a request's share of each batched call.",
        "",
        "| phase | family | backend | clients | requests | images/s | p50 s | p95 s "
        "| engine ms/image | engine ms/step | errors |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    flux_alone = [phase for phase in phases if phase.name == "flux alone"]
    lines += [row(phase, "flux") for phase in flux_alone]
    lines += [
        f"| flux alone | flux | {name} | {why} |" + " |" * 7 for name, why in NOT_MEASURED.items()
    ]
    lines += [
        row(phase, family)
        for phase in phases
        if phase not in flux_alone
        for family in FAMILIES
        if family in phase.runs
    ]
    by_name = {(phase.name, phase.backend): phase for phase in phases}
    notes = backend_lines(by_name, build) + mixed_lines(by_name)
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with bounds checked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdxl", default="kiln-shapes", help="built-in name or SDXL folder")
    parser.add_argument("--flux", default="kiln-flux-shapes", help="built-in name or FLUX folder")
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="comma-separated: torch (FLUX alone, SDXL alone, mixed), onnxruntime (FLUX alone "
        "from freshly built ONNX engines)",
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
    names = {name.strip() for name in args.backends.split(",") if name.strip()}
    for name in sorted(names - set(BACKENDS)):
        why = NOT_MEASURED.get(name, f"choose from {', '.join(BACKENDS)}")
        parser.error(f"--backends {name}: {why}")
    if not names:
        parser.error(f"--backends needs at least one of {', '.join(BACKENDS)}")
    args.backends = tuple(name for name in BACKENDS if name in names)
    return args


def measure(args: argparse.Namespace, workdir: Path) -> tuple[list[Phase], Build | None]:
    """Each backend's phases (servers, engines and logs under `workdir`), and the build."""
    half = args.clients // 2
    phases: list[Phase] = []
    build = None
    if "torch" in args.backends:
        plan = [
            ("flux alone", {"flux": args.clients}),
            ("sdxl alone", {"sdxl": args.clients}),
            ("mixed", {"flux": half, "sdxl": args.clients - half}),
        ]
        phases += run_server(workdir / "torch", args, "torch", plan, "--backend", "torch")
    if "onnxruntime" in args.backends:
        print("building the FLUX model's ONNX engines", flush=True)
        build = build_flux_engines(args, workdir / "engines")
        plan = [("flux alone", {"flux": args.clients})]
        # Asked for: on a GPU host the automatic choice for FLUX would be torch on CUDA.
        engines = ("--backend", "onnxruntime", "--engines", str(workdir / "engines"))
        phases += run_server(workdir / "onnxruntime", args, "onnxruntime", plan, *engines)
    return phases, build


def main(argv: list[str] | None = None) -> int:
    """Run each backend's phases and print (or write) the section."""
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="kiln-families-") as tmp:
        phases, build = measure(args, Path(tmp))
    loads = (load_before, os.getloadavg()[0])
    command = ".venv/bin/python benchmarks/families.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    section = report(phases, build, args, command.strip(), loads)
    print(section)
    if args.results:
        write_section(SECTION, section, args.results_file)
    failed = sum(run.errors for phase in phases for run in phase.runs.values())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
