"""Load benchmark: a real `kiln serve` driven by N concurrent asyncio clients.

For each concurrency N it starts a fresh server (so batch statistics are per run), keeps N
requests in flight (closed loop) for a bounded time, and reports images/second, latency
percentiles, queue time, and the server's mean UNet batch (rows per step, read from its
shutdown log). It also measures the service's overhead: one request end to end over gRPC
against the same generation called in-process.

    .venv/bin/python benchmarks/load.py --concurrency 1 4 8 16 --duration 30

Results go to stdout as a Markdown table; `--write-results` replaces this benchmark's
section of benchmarks/RESULTS.md, and `--json FILE` also writes them as JSON (what
`kiln cost --results FILE` reads: engine seconds and images of each level).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from results_file import publish

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.proto.kiln.v1 import generation_service_pb2_grpc as pb_grpc
from kiln_server.atomic_files import write_atomic
from kiln_server.local import LocalServer, start_local_server
from kiln_server.models.registry import default_builtin_name

SECTION = "## Throughput under load (benchmarks/load.py)"
PROMPTS = [
    "a red circle on a blue background",
    "a yellow triangle on a purple background",
    "a green square on a white background",
    "a blue star on an orange background",
    "a product photo of a teapot on marble",
    "a white mug on a wooden table",
]


@dataclass
class RunResult:
    """Measurements of one concurrency level."""

    concurrency: int
    requests: int
    images: int
    seconds: float
    latencies: list[float]
    queue_seconds: list[float]
    mean_batch_rows: float
    errors: int
    # From the `completed` events: the requests' engine seconds and their images.
    engine_seconds: float = 0.0
    completed_images: int = 0

    @property
    def images_per_second(self) -> float:
        """Completed images per wall-clock second."""
        return self.images / self.seconds if self.seconds else 0.0


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def batcher_stats(logs: str) -> dict[str, float]:
    """The UNet steps and rows the server's engine core logged on shutdown."""
    stats: dict[str, float] = {}
    for line in logs.splitlines():
        if '"batcher stats"' in line:
            record = json.loads(line)
            stats = {k: float(v) for k, v in record.items() if k in ("steps", "rows")}
    return stats


def start_server(workdir: Path, args: argparse.Namespace, config: Path) -> LocalServer:
    """A fresh benchmarked `kiln serve`, SERVING."""
    return start_local_server(workdir, *server_args(args, config), timeout=300)


def make_request(index: int, args: argparse.Namespace) -> pb.GenerateRequest:
    """The index-th request of the workload: its own prompt and seed."""
    return pb.GenerateRequest(
        model=args.model,
        prompt=PROMPTS[index % len(PROMPTS)],
        num_outputs=args.num_outputs,
        seed=1000 + index,
        num_inference_steps=args.steps,
    )


async def closed_loop(address: str, concurrency: int, args: argparse.Namespace) -> RunResult:
    """Keep `concurrency` requests in flight until the duration or request budget ends."""
    latencies: list[float] = []
    queue_times: list[float] = []
    counter = {"next": 0, "images": 0, "errors": 0, "completed_images": 0}
    engine_seconds: list[float] = []
    deadline = time.monotonic() + args.duration
    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)

        async def worker() -> None:
            while time.monotonic() < deadline and counter["next"] < args.max_requests:
                index = counter["next"]
                counter["next"] += 1
                started = time.perf_counter()
                try:
                    async for event in stub.Generate(make_request(index, args), timeout=600):
                        if event.HasField("image"):
                            counter["images"] += 1
                        elif event.HasField("completed"):
                            queue_times.append(event.completed.queue_seconds)
                            engine_seconds.append(event.completed.engine_seconds)
                            counter["completed_images"] += event.completed.num_images
                    latencies.append(time.perf_counter() - started)
                except grpc.aio.AioRpcError:
                    counter["errors"] += 1

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return RunResult(
        concurrency,
        len(latencies),
        counter["images"],
        elapsed,
        latencies,
        queue_times,
        0.0,
        counter["errors"],
        sum(engine_seconds),
        counter["completed_images"],
    )


def server_args(args: argparse.Namespace, config: Path) -> list[str]:
    """Flags for the benchmarked server."""
    flags = ["--config", str(config), "--max-queue", "256"]
    flags += ["--intra-op-threads", str(args.intra_op_threads)]
    if args.backend:
        flags += ["--backend", args.backend]
    if args.engines:
        flags += ["--engines", str(args.engines)]
    return flags


def write_config(workdir: Path, args: argparse.Namespace) -> Path:
    """Config serving one model with the benchmark's batch cap."""
    config = workdir / "kiln.toml"
    model = args.model
    source = f'builtin = "{model}"' if not args.model_path else f'path = "{args.model_path}"'
    config.write_text(
        f'[server]\ndefault_model = "{model}"\n\n'
        f'[[models]]\nname = "{model}"\n{source}\nmax_batch_rows = {args.max_batch_rows}\n'
    )
    return config


@dataclass(frozen=True)
class OverheadRound:
    """Median seconds of one request over gRPC and of the same generation in-process."""

    remote: float
    local: float

    @property
    def percent(self) -> float:
        """How much longer the gRPC request took, in percent of the in-process run."""
        return (self.remote - self.local) / self.local * 100 if self.local else 0.0


def measure_overhead(
    args: argparse.Namespace, address: str, repeats: int, rounds: int
) -> list[OverheadRound]:
    """`rounds` rounds of `repeats` interleaved pairs: gRPC request vs in-process run.

    Rounds show the spread: on a shared virtual machine one round can land in a slow
    minute for one side.
    """
    from kiln_server.engines.loading import load_engine_set, resolve_backend
    from kiln_server.imaging import encode_image
    from kiln_server.models.loader import read_model_files
    from kiln_server.models.registry import ModelRegistry
    from kiln_server.pipeline.sdxl import SDXLPipeline
    from kiln_server.runtime import default_engine_threads
    from kiln_server.service import png_parameters
    from kiln_server.settings import load_settings
    from kiln_server.validation import validate_request

    settings, config = load_settings({"config": write_config(Path(args.workdir), args)})
    registry = ModelRegistry.from_config(config, settings.cache_dir)
    spec = next(iter(registry.models.values()))
    files = read_model_files(spec.path)
    engines_dir = args.engines / spec.name if args.engines else None
    backend = resolve_backend(args.backend, engines_dir)
    import torch

    threads = args.intra_op_threads or default_engine_threads()
    torch.set_num_threads(threads)
    engines = load_engine_set(backend, files, engines_dir, threads=threads)
    pipeline = SDXLPipeline(files, engines)
    request = make_request(0, args)
    params = validate_request(
        request,
        registry,
        lambda _m, text: pipeline.prompt_encoder.tokenizer.count_tokens(text),
        lambda _m: pipeline.prompt_encoder.tokenizer.max_tokens,
    )

    def in_process() -> None:
        for pixels, seed in zip(pipeline.generate(params), params.seeds, strict=True):
            encode_image(pixels, "png", 90, png_parameters(params, seed))

    options = [("grpc.max_receive_message_length", 64 << 20)]
    channel = grpc.insecure_channel(address, options=options)
    stub = pb_grpc.GenerationServiceStub(channel)
    in_process()  # warm-ups
    list(stub.Generate(request))
    results = []
    for _ in range(rounds):
        local, remote = [], []
        # Interleaved, so drift in the shared machine's speed hits both sides alike.
        for _ in range(repeats):
            started = time.perf_counter()
            in_process()
            local.append(time.perf_counter() - started)
            started = time.perf_counter()
            list(stub.Generate(request))
            remote.append(time.perf_counter() - started)
        results.append(OverheadRound(statistics.median(remote), statistics.median(local)))
    channel.close()
    return results


def run(args: argparse.Namespace) -> str:
    """Run every concurrency level and the overhead measurement; return the report."""
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory() as tmp:
        args.workdir = tmp
        config = write_config(Path(tmp), args)
        for concurrency in args.concurrency:
            workdir = Path(tmp) / f"n{concurrency}"
            workdir.mkdir()
            server = start_server(workdir, args, config)
            try:
                result = asyncio.run(closed_loop(server.address, concurrency, args))
            finally:
                server.terminate(timeout=120)
            stats = batcher_stats(server.logs())
            if stats.get("steps"):
                result.mean_batch_rows = stats["rows"] / stats["steps"]
            results.append(result)
            print(
                f"N={concurrency}: {result.images_per_second:.2f} img/s, "
                f"p50 {percentile(result.latencies, 50):.3f}s, "
                f"batch {result.mean_batch_rows:.2f} rows",
                file=sys.stderr,
            )
        overhead: list[OverheadRound] = []
        if args.overhead_rounds and args.overhead_repeats:
            workdir = Path(tmp) / "overhead"
            workdir.mkdir()
            server = start_server(workdir, args, config)
            try:
                overhead = measure_overhead(
                    args, server.address, args.overhead_repeats, args.overhead_rounds
                )
            finally:
                server.terminate(timeout=120)
    if args.json:
        write_atomic(args.json, json.dumps(results_document(results, args), indent=2) + "\n")
    return report(results, overhead, args)


def machine() -> str:
    """The machine a run measured, for the report and the JSON results."""
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def results_document(results: list[RunResult], args: argparse.Namespace) -> dict[str, object]:
    """The `--json` results: the workload and every level's figures, engine seconds included."""
    return {
        "benchmark": "benchmarks/load.py",
        "measured": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "command": f"benchmarks/load.py {' '.join(sys.argv[1:])}",
        "model": args.model,
        "backend": args.backend or "auto",
        "steps": args.steps or None,
        "num_outputs": args.num_outputs,
        "max_batch_rows": args.max_batch_rows,
        "intra_op_threads": args.intra_op_threads,
        "levels": [
            {
                "concurrency": r.concurrency,
                "requests": r.requests,
                "images": r.images,
                "errors": r.errors,
                "seconds": r.seconds,
                "images_per_second": r.images_per_second,
                "p50_seconds": percentile(r.latencies, 50),
                "p95_seconds": percentile(r.latencies, 95),
                "p99_seconds": percentile(r.latencies, 99),
                "mean_queue_seconds": statistics.mean(r.queue_seconds) if r.queue_seconds else 0.0,
                "mean_batch_rows": r.mean_batch_rows,
                "engine_seconds": r.engine_seconds,
                "completed_images": r.completed_images,
            }
            for r in results
        ],
    }


def overhead_report(overhead: list[OverheadRound], repeats: int) -> list[str]:
    """Markdown lines for the service-overhead rounds and their median."""
    median_round = sorted(overhead, key=lambda r: r.percent)[len(overhead) // 2]
    lines = [
        f"Service overhead, one request alone: the gRPC end-to-end time against the same "
        f"generation + PNG encoding in-process, interleaved, median of {repeats} pairs per "
        "round:",
        "",
        "| round | gRPC ms | in-process ms | overhead |",
        "|---:|---:|---:|---:|",
    ]
    for index, round_ in enumerate(overhead, 1):
        lines.append(
            f"| {index} | {round_.remote * 1000:.1f} | {round_.local * 1000:.1f} "
            f"| {round_.percent:+.1f}% |"
        )
    return [*lines, "", f"Median round: {median_round.percent:+.1f}%.", ""]


def report(
    results: list[RunResult], overhead: list[OverheadRound], args: argparse.Namespace
) -> str:
    """Markdown section with the machine, the command and the table."""
    baseline = next((r for r in results if r.concurrency == 1), results[0])
    lines = [
        SECTION,
        "",
        f"Machine: {machine()}; measured {time.strftime('%Y-%m-%d')}.",
        f"Command: `.venv/bin/python benchmarks/load.py {' '.join(sys.argv[1:])}`",
        f"Workload: model `{args.model}` at its default size, "
        f"{args.steps or 'default'} steps, {args.num_outputs} image(s) per request, distinct "
        f"prompts and seeds, closed loop for {args.duration:g} s per level, "
        f"max_batch_rows {args.max_batch_rows}, backend {args.backend or 'auto'}, "
        f"{args.intra_op_threads or 'default (every core but one)'} engine thread(s).",
        "",
        "| clients | requests | images/s | vs sequential | p50 s | p95 s | p99 s "
        "| mean queue s | mean batch rows | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = r.images_per_second / baseline.images_per_second if baseline else 0.0
        queue = statistics.mean(r.queue_seconds) if r.queue_seconds else 0.0
        lines.append(
            f"| {r.concurrency} | {r.requests} | {r.images_per_second:.2f} | {ratio:.2f}x "
            f"| {percentile(r.latencies, 50):.3f} | {percentile(r.latencies, 95):.3f} "
            f"| {percentile(r.latencies, 99):.3f} | {queue:.3f} | {r.mean_batch_rows:.2f} "
            f"| {r.errors} |"
        )
    lines += [
        "",
        "Sequential = 1 client (one request at a time). Mean batch rows counts UNet rows per "
        "step (a request under guidance adds 2 rows per image).",
        "",
    ]
    if overhead:
        lines += overhead_report(overhead, args.overhead_repeats)
    return "\n".join(lines)


def main() -> int:
    """Parse flags, run the benchmark, print (and optionally record) the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per level")
    parser.add_argument("--max-requests", type=int, default=2000, help="cap per level")
    parser.add_argument(
        "--model", default=default_builtin_name(), help="built-in model name (default: the default)"
    )
    parser.add_argument("--model-path", type=Path, help="serve this SDXL folder instead")
    parser.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"))
    parser.add_argument("--engines", type=Path, help="engines folder for the backend")
    parser.add_argument("--steps", type=int, default=0, help="0 = the model default")
    parser.add_argument("--num-outputs", type=int, default=1)
    parser.add_argument("--max-batch-rows", type=int, default=16)
    parser.add_argument(
        "--overhead-repeats", type=int, default=20, help="interleaved pairs per overhead round"
    )
    parser.add_argument("--overhead-rounds", type=int, default=3, help="overhead rounds")
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=1,
        help="server engine threads (default 1: the load generator and the API process "
        "need the other core on a 2-core machine; 0 = the server's default, every core "
        "but one)",
    )
    parser.add_argument("--write-results", action="store_true", help="update RESULTS.md")
    parser.add_argument(
        "--json",
        type=Path,
        metavar="FILE",
        help="also write the results as JSON, per level with engine seconds and images "
        "(what `kiln cost --results FILE` reads)",
    )
    args = parser.parse_args()
    section = run(args)
    publish(SECTION, section, args.write_results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
