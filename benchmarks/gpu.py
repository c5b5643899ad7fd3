"""Kiln on a CUDA GPU: SDXL base's full architecture, diffusers vs Kiln, one command.

    .venv/bin/python benchmarks/gpu.py [--write-results] [--variants ...] [--cache-dir DIR]
    .venv/bin/python benchmarks/gpu.py --smoke [--results-file FILE]

Built to finish within 8 minutes on one CUDA GPU, the model's generation included:
1. generates `kiln-sdxl-base-arch` (SDXL base 1.0's architecture, random fp16 weights)
   directly on the GPU into `--cache-dir`, or reuses it, and loads it once (UNet and text
   encoders fp16, the VAE in fp32 as its force_upcast asks);
2. times one request (1024x1024, 30 steps, guidance 5, K_EULER, one image; a new prompt
   and seed per run) through diffusers' StableDiffusionXLPipeline (fp16, SDPA, CPU
   generators) and through Kiln's pipeline on the torch backend: plain, with CUDA graphs,
   with torch.compile, and with both (`--variants`). All share the loaded modules. Each
   is warmed up first (diffusers: one untimed generation; Kiln: the server's warm-up,
   which pays compilation and graph capture) and reports the warm-up's seconds, the
   median seconds per image, the UNet iterations per second (CUDA events between
   consecutive UNet iterations), the UNet's achieved TFLOP/s against the GPU's dense
   fp16/bf16 peak (FLOPs counted with FlopCounterMode on meta tensors, as
   benchmarks/backends.py does) and the peak GPU memory of its timed runs;
3. measures what a preview costs a step (preview pixels, copy and encode vs none);
4. measures images per second through the batcher with 1, 4 and 8 concurrent requests;
5. reports the goals (met / not met), never asserting them.
Every phase has a time budget (`--budget`), and the whole run a deadline (`--deadline`):
a variant that would not fit is skipped and says so, one that fails reports its error and
the run goes on, and at the deadline whatever was measured is printed (and written) before
the process exits. Progress goes to stderr, the report (Markdown) to stdout;
`--write-results` replaces this benchmark's section of benchmarks/RESULTS.md.

Without a CUDA GPU it exits 2. `--smoke` runs the same code on the CPU with the small
`kiln-tiny-sdxl` model at its default size and a few steps, in well under a minute
(compilation and CUDA graphs skipped), so the test suite keeps this script working;
`--results-file` then says where its section goes (never RESULTS.md). Exit status: 0 when
everything that ran succeeded, 1 when a phase failed, 3 when stopped at the deadline.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from flops import unet_flops
from results_file import cpu_name, write_section

SECTION = "## GPU: diffusers vs Kiln on SDXL base's architecture (benchmarks/gpu.py)"
DEFAULT_CACHE_DIR = Path("/tmp/kiln-gpu-bench")
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
STARTED = time.perf_counter()

# Dense (no sparsity) fp16/bf16 tensor-core peaks with fp32 accumulation (what PyTorch's
# fp16 GEMMs use), in TFLOP/s, from NVIDIA's datasheets (half the sparsity figures). The
# first entry whose text occurs in torch.cuda.get_device_name() applies; more specific
# names come first.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM5 ("H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
    ("RTX 4090", 165.0),  # 330 only with fp16 accumulation
)
GOAL_UNET_ITS = 15.0  # on an H100 or H200, compiled
GOAL_DECODER_PREVIEW_SHARE = 2.0  # issue 16: a learned preview at most 2% of a step
STABLE_FAST_H100_ITS = 21.6  # stable-fast's published SDXL figure on an H100
GOAL_BATCHING_SPEEDUP = 1.5  # 4 concurrent requests vs 1


@dataclass(frozen=True)
class Variant:
    """One row of the runner table: diffusers, or Kiln's pipeline with these options."""

    key: str
    label: str
    compile: bool = False
    cuda_graphs: bool = False


VARIANTS = (
    Variant("diffusers", "diffusers StableDiffusionXLPipeline (eager, SDPA)"),
    Variant("plain", "Kiln torch, plain"),
    Variant("cuda-graphs", "Kiln torch, CUDA graphs", cuda_graphs=True),
    Variant("compile", "Kiln torch, compile", compile=True),
    Variant("compile+cuda-graphs", "Kiln torch, compile + CUDA graphs", True, True),
)
VARIANT_KEYS = tuple(v.key for v in VARIANTS)
BATCHER_VARIANTS = ("plain", "cuda-graphs")
# Seconds per phase on a GPU: a phase starts only while this much is left before the
# deadline, and stops its timed repeats when it has used it. An eager SDXL generation at
# 1024x1024 takes a few seconds on an H100; compiling its UNet one to two minutes, and the
# second compilation (compile + CUDA graphs) may reuse the first one's caches.
GPU_BUDGETS = {
    "diffusers": 45.0,
    "plain": 45.0,
    "cuda-graphs": 45.0,
    "compile": 150.0,
    "compile+cuda-graphs": 90.0,
    "batcher": 75.0,
}
SMOKE_BUDGETS = dict.fromkeys(GPU_BUDGETS, 20.0)


def say(message: str) -> None:
    """A progress line on stderr, stamped with the seconds since the script started."""
    print(f"[{time.perf_counter() - STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float | None:
    """The median, or None when nothing was measured."""
    return statistics.median(values) if values else None


def short_error(exc: BaseException) -> str:
    """`Type: first line of the message`, short enough for a table cell."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text.replace("|", "/")
    return f"{type(exc).__name__}: {text[:240]}" if text else type(exc).__name__


# ----- the machine -----


def driver_version(device: torch.device) -> str:
    """The NVIDIA driver version from nvidia-smi, else the CUDA driver API version."""
    try:
        out = subprocess.run(
            [
                "nvidia-smi",
                f"--id={device.index or 0}",
                "--query-gpu=driver_version",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.strip()
        if out:
            return out.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        version = int(torch._C._cuda_getDriverVersion())  # type: ignore[attr-defined]
        api = f"{version // 1000}.{version % 1000 // 10}"
        return f"unknown (nvidia-smi unavailable; CUDA driver API {api})"
    except Exception:
        return "unknown (nvidia-smi unavailable)"


def peak_tflops(device_name: str) -> float | None:
    """The dense fp16/bf16 tensor-core peak of a GPU by name, or None when not known."""
    for needle, tflops in PEAK_TFLOPS:
        if needle.lower() in device_name.lower():
            return tflops
    return None


@dataclass(frozen=True)
class Machine:
    """What the report names: the device, its driver and the software versions."""

    device: torch.device
    name: str
    details: str
    peak: float | None

    @classmethod
    def probe(cls, device: torch.device) -> Machine:
        """Read the GPU (or, for --smoke, the CPU) and the versions of torch and friends."""
        import diffusers
        import transformers

        software = (
            f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers "
            f"{transformers.__version__}, Python {platform.python_version()}"
        )
        if device.type != "cuda":
            name = cpu_name()
            return cls(
                device,
                name,
                f"CPU: {name}, {os.cpu_count()} cores (smoke run: not GPU numbers); {software}",
                None,
            )
        props = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        cudnn = torch.backends.cudnn.version()
        details = (
            f"GPU: {name} (compute capability {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.1f} GiB), driver {driver_version(device)}, "
            f"CUDA {torch.version.cuda} (torch's), cuDNN {cudnn}; {software}; "
            f"{os.cpu_count()} CPU cores ({cpu_name()})"
        )
        return cls(device, name, details, peak_tflops(name))


# ----- timing -----


class Clock:
    """Marks points in the stream of device work, and measures between them.

    On CUDA a mark is an event recorded on the current stream, so marking never waits for
    the GPU; on the CPU the work is done when the call returns and a mark is the time.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        """Wait for all queued device work."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def mark(self) -> Any:
        """A point after the work queued so far."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        """Seconds between two marks (waits for the later one on CUDA)."""
        if not self.cuda:
            return float(end - start)
        end.synchronize()
        return float(start.elapsed_time(end)) / 1000.0

    def reset_peak(self) -> None:
        """Start a new peak-memory window."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        """Peak allocated device memory since reset_peak, in GiB (None on the CPU)."""
        if not self.cuda:
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**30

    def free(self) -> None:
        """Return freed blocks to the device, so the next variant's peak is its own."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def iterations_per_second(clock: Clock, marks: Sequence[Any]) -> float | None:
    """UNet iterations per second from marks taken after each iteration."""
    if len(marks) < 2:
        return None
    seconds = clock.seconds(marks[0], marks[-1])
    return (len(marks) - 1) / seconds if seconds > 0 else None


# ----- the report -----


@dataclass
class RunnerRow:
    """One runner's measurements, or why there are none."""

    variant: Variant
    status: str = "not run"
    warm_up: float | None = None
    seconds: list[float] = field(default_factory=list)
    its: list[float] = field(default_factory=list)
    peak_gib: float | None = None

    @property
    def ok(self) -> bool:
        """Whether the runner produced measurements."""
        return self.status == "ok" and bool(self.seconds)


@dataclass
class BatcherRow:
    """Throughput at one concurrency."""

    concurrency: int
    status: str = "not run"
    images: int = 0
    seconds: float = 0.0
    waves: int = 0
    mean_rows: float = 0.0
    peak_gib: float | None = None

    @property
    def images_per_second(self) -> float | None:
        """Images finished per second of the timed waves."""
        return self.images / self.seconds if self.status == "ok" and self.seconds else None


@dataclass
class PreviewCost:
    """Medians of a denoising step without and with a preview of one method."""

    method: str = "latent_rgb"
    status: str = "not run"
    step: float | None = None
    step_with_preview: float | None = None
    encode: float | None = None
    pairs: int = 0

    @property
    def extra(self) -> float | None:
        """What the preview adds to a step, in seconds."""
        if self.step is None or self.step_with_preview is None:
            return None
        return self.step_with_preview - self.step


@dataclass
class Report:
    """Everything measured so far; rendered at the end, or at the deadline."""

    machine: Machine
    command: str
    smoke: bool
    deadline: float
    model_line: str = ""
    request_line: str = ""
    flops_line: str = ""
    unet_flops: float | None = None
    runners: list[RunnerRow] = field(default_factory=list)
    batcher_variant: str = "plain"
    batcher_rows_cap: int = 0
    batcher_rows_source: str = "the server's default"
    request_rows: int = 1
    batcher: list[BatcherRow] = field(default_factory=list)
    previews: list[PreviewCost] = field(default_factory=lambda: [PreviewCost()])
    timeline: list[tuple[str, float]] = field(default_factory=list)
    phase: str = "starting"
    interrupted: str | None = None

    def tflops(self, its: float | None) -> str:
        """Achieved UNet TFLOP/s at `its` iterations per second, and its share of peak."""
        if its is None or self.unet_flops is None:
            return "-"
        achieved = self.unet_flops * its / 1e12
        if self.machine.peak is None:
            return f"{achieved:.3g} (peak unknown)"
        return f"{achieved:.3g} ({achieved / self.machine.peak:.0%})"

    def render(self) -> str:
        """The Markdown section."""
        lines = [SECTION, ""]
        if self.smoke:
            lines += [
                "Smoke run (`--smoke`): the CPU and the small kiln-tiny-sdxl model; the "
                "numbers only show that the script works, they say nothing about a GPU.",
                "",
            ]
        lines += [
            f"{self.machine.details}; measured {utc_now()}.",
            f"Command: `{self.command}`",
            self.model_line,
            self.request_line,
            self.flops_line,
            "",
        ]
        if self.interrupted:
            lines += [
                f"**Stopped at the {self.deadline:.0f} s deadline during: {self.interrupted}.** "
                "Rows below that say 'not run' had no time.",
                "",
            ]
        lines += [
            "| runner | s / image | UNet it/s | UNet TFLOP/s (of peak) | peak GiB "
            "| warm-up s | timed runs | status |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in self.runners:
            per_image, its = median(row.seconds), median(row.its)
            lines.append(
                f"| {row.variant.label} | {fmt(per_image, '.3f')} | {fmt(its, '.2f')} "
                f"| {self.tflops(its)} | {fmt(row.peak_gib, '.1f')} | {fmt(row.warm_up, '.1f')} "
                f"| {len(row.seconds)} | {row.status} |"
            )
        lines += [
            "",
            "Warm-up: diffusers, one untimed generation; Kiln, the server's warm-up "
            "(kiln_server.runtime.warm_up: two steps with a preview and a decode at the "
            "request's size), which is where torch.compile compiles and CUDA graphs are "
            "captured. s / image: median wall time from request to images on the host. UNet "
            "it/s: median over runs of (steps - 1) / time between the ends of the first and "
            "last UNet iterations (CUDA events; an iteration is the UNet call, guidance and "
            "the scheduler step). Peak GiB: torch.cuda.max_memory_allocated over the timed "
            "runs, weights included.",
            "",
            f"### Batcher throughput (Kiln torch, {self.batcher_variant})",
            "",
            "Same request, no previews; each wave submits N requests at once and waits for "
            f"all. The batcher runs at most {self.batcher_rows_cap} UNet rows per step "
            f"({self.batcher_rows_source}), so at most "
            f"{max(1, self.batcher_rows_cap // max(self.request_rows, 1))} of these requests "
            f"({self.request_rows} rows each) share a step; the others wait their turn.",
            "",
            "| concurrent requests | images / s | vs 1 | mean UNet rows per step | waves "
            "| peak GiB | status |",
            "|---:|---:|---:|---:|---:|---:|---|",
        ]
        single = next((r.images_per_second for r in self.batcher if r.concurrency == 1), None)
        for level in self.batcher:
            rate = level.images_per_second
            ratio = rate / single if rate is not None and single else None
            lines.append(
                f"| {level.concurrency} | {fmt(rate, '.3f')} | {fmt(ratio, '.2f', 'x')} "
                f"| {fmt(level.mean_rows if level.waves else None, '.1f')} | {level.waves} "
                f"| {fmt(level.peak_gib, '.1f')} | {level.status} |"
            )
        pairs = max((cost.pairs for cost in self.previews), default=0)
        lines += [
            "",
            "### Preview cost per step (Kiln torch, plain)",
            "",
            "A step alone vs a step plus its preview, per method: latent_rgb maps the "
            "predicted latents to RGB on the device; decoder runs the model's learned preview "
            "decoder (TAESD architecture) and downscales on the device; then the copy to the "
            "host, resize and JPEG encode at 256 px, which in the server run on the output "
            f"thread, off the engine thread. Medians of {pairs} pairs.",
            "",
            "| method | step alone ms | step + preview ms | preview ms | of a step "
            "| of which encode ms | status |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for cost in self.previews:
            extra = cost.extra
            share = 100 * extra / cost.step if extra is not None and cost.step else None
            lines.append(
                f"| {cost.method} | {fmt_ms(cost.step)} | {fmt_ms(cost.step_with_preview)} "
                f"| {fmt_ms(extra)} | {fmt(share, '.1f', '%')} | {fmt_ms(cost.encode)} "
                f"| {cost.status} |"
            )
        lines += [
            "",
            "### Goals (reported, not asserted)",
            "",
            *[f"- {line}" for line in self.goals()],
            "",
            "Timeline: "
            + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.timeline)
            + f" (deadline {self.deadline:.0f} s).",
        ]
        return "\n".join(lines) + "\n"

    def goals(self) -> list[str]:
        """One line per goal: met / not met / not measured, with the numbers."""
        rows = {row.variant.key: row for row in self.runners}
        lines = []
        diffusers = rows.get("diffusers")
        kiln = [r for r in self.runners if r.variant.key != "diffusers" and r.ok]
        if diffusers is None or not diffusers.ok or not kiln:
            lines.append("Kiln at or below diffusers' time per image: **not measured**")
        else:
            reference = median(diffusers.seconds) or 0.0
            best = min(kiln, key=lambda r: median(r.seconds) or float("inf"))
            best_s = median(best.seconds) or 0.0
            others = "; ".join(f"{r.variant.label} {median(r.seconds):.3f} s" for r in kiln)
            lines.append(
                "Kiln at or below diffusers' time per image: "
                f"**{'met' if best_s <= reference else 'not met'}** (best: {best.variant.label} "
                f"{best_s:.3f} s vs diffusers {reference:.3f} s; {others})"
            )
        compiled = [r for r in kiln if r.variant.compile and r.its]
        name = self.machine.name
        if not compiled:
            verdict = "**not measured** (no compiled variant ran)"
        else:
            best = max(compiled, key=lambda r: median(r.its) or 0.0)
            its = median(best.its) or 0.0
            if self.machine.device.type != "cuda" or not any(
                gpu in name for gpu in ("H100", "H200")
            ):
                verdict = f"**not applicable** on {name} ({its:.2f} it/s, {best.variant.label})"
            else:
                met = "met" if its >= GOAL_UNET_ITS else "not met"
                verdict = f"**{met}** ({its:.2f} it/s, {best.variant.label})"
        lines.append(
            f"At least {GOAL_UNET_ITS:g} UNet it/s with compilation on an H100 or H200 "
            f"(stable-fast publishes {STABLE_FAST_H100_ITS} on an H100): {verdict}"
        )
        rates = {r.concurrency: r.images_per_second for r in self.batcher}
        one, four = rates.get(1), rates.get(4)
        if one is None or four is None:
            lines.append(
                f"Batching: 4 concurrent requests at least {GOAL_BATCHING_SPEEDUP}x the images "
                "/ s of one: **not measured**"
            )
        else:
            ratio = four / one
            met = "met" if ratio >= GOAL_BATCHING_SPEEDUP else "not met"
            lines.append(
                f"Batching: 4 concurrent requests at least {GOAL_BATCHING_SPEEDUP}x the images "
                f"/ s of one: **{met}** ({ratio:.2f}x: {four:.3f} vs {one:.3f} images / s)"
            )
        decoder = next((c for c in self.previews if c.method == "decoder"), None)
        goal = f"The learned preview decoder at most {GOAL_DECODER_PREVIEW_SHARE:g}% of a step"
        if decoder is None or decoder.extra is None or not decoder.step:
            lines.append(f"{goal} at SDXL 1024x1024 on a GPU: **not measured**")
        else:
            share = 100 * decoder.extra / decoder.step
            if self.machine.device.type != "cuda":
                verdict = f"**not applicable** on {self.machine.name} ({share:.1f}%)"
            else:
                verdict = f"**{'met' if share <= GOAL_DECODER_PREVIEW_SHARE else 'not met'}**"
                verdict += f" ({share:.1f}%)"
            lines.append(f"{goal} at SDXL 1024x1024 on a GPU: {verdict}")
        return lines


def utc_now() -> str:
    """The date and time now, for the report."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    """A number for a table cell, '-' when missing."""
    return "-" if value is None else f"{value:{spec}}{suffix}"


def fmt_ms(seconds: float | None) -> str:
    """Seconds as milliseconds for a table cell."""
    return fmt(None if seconds is None else seconds * 1000, ".2f")


class Deadline:
    """The whole run's time limit. At the deadline, whatever was measured is printed and
    written by `finish`, and the process exits: a GPU session gets one try."""

    def __init__(self, seconds: float, finish: Callable[[str], None]) -> None:
        self.seconds = seconds
        self.ends = time.perf_counter() + seconds
        self._timer = threading.Timer(seconds, lambda: finish("deadline"))
        self._timer.daemon = True
        self._timer.start()

    def left(self) -> float:
        """Seconds until the deadline."""
        return self.ends - time.perf_counter()

    def cancel(self) -> None:
        """The run finished in time."""
        self._timer.cancel()


# ----- the runners -----


@dataclass
class Setup:
    """What every phase shares: the model, the request and the loaded modules."""

    spec: Any
    files: Any
    modules: Any
    machine: Machine
    clock: Clock
    dtype: torch.dtype
    repeats: int

    def request(self, index: int, **overrides: Any) -> Any:
        """Request `index`: the measured settings (the spec's defaults), its own prompt and
        seed (so Kiln's prompt cache does not skip the text encoders that diffusers runs
        every time)."""
        prompt = f"{PROMPT}, take {index}"
        return self.spec.default_request(prompt, **{"seed": 1000 + index, **overrides})


def kiln_pipeline(setup: Setup, variant: Variant) -> Any:
    """Kiln's pipeline over the shared modules with `variant`'s compile / CUDA graphs."""
    from kiln_server.engines.device import Placement
    from kiln_server.engines.torch_engine import load_torch_engines
    from kiln_server.pipeline.sdxl import SDXLPipeline

    placement = Placement(setup.machine.device, setup.dtype, variant.compile, variant.cuda_graphs)
    engines = load_torch_engines(
        setup.modules, setup.files.dims, placement, vae_upcast=setup.files.vae_force_upcast
    )
    return SDXLPipeline(setup.files, engines)


def kiln_generate(pipeline: Any, clock: Clock, params: Any) -> list[Any]:
    """One request through Kiln's pipeline (images to the host); a mark after each step."""
    state = pipeline.prepare(params)
    marks = []
    while not state.finished:
        pipeline.denoise_step([state])
        marks.append(clock.mark())
    pipeline.decode(state).cpu().numpy()
    return marks


def diffusers_generate(reference: Any, clock: Clock, params: Any) -> list[Any]:
    """One request through diffusers' pipeline; a mark after each UNet call."""
    marks: list[Any] = []
    handle = reference.pipeline.unet.register_forward_hook(lambda *_: marks.append(clock.mark()))
    try:
        reference.generate(params)
    finally:
        handle.remove()
    return marks


def timed_runs(
    setup: Setup,
    row: RunnerRow,
    run: Callable[[Any], list[Any]],
    budget_ends: float,
) -> None:
    """`setup.repeats` timed runs (at least one; fewer when the budget runs out)."""
    clock = setup.clock
    clock.reset_peak()
    for index in range(setup.repeats):
        if index and time.perf_counter() > budget_ends:
            say(f"  {row.variant.key}: budget spent after {index} timed run(s)")
            break
        clock.sync()
        started = time.perf_counter()
        marks = run(setup.request(index))
        clock.sync()
        row.seconds.append(time.perf_counter() - started)
        its = iterations_per_second(clock, marks)
        if its is not None:
            row.its.append(its)
        say(
            f"  {row.variant.key}: run {index + 1}: {row.seconds[-1]:.3f} s, {fmt(its, '.2f')} it/s"
        )
    row.peak_gib = clock.peak_gib()
    row.status = "ok"


def diffusers_modules(setup: Setup) -> Any:
    """The shared modules as diffusers runs them: when Kiln keeps the VAE in fp32 beside an
    fp16 UNet, diffusers gets its own fp16 VAE, which its pipeline upcasts to decode (its
    `force_upcast` path) and casts back; it cannot decode its fp16 latents with an fp32 VAE.
    """
    from diffusers import AutoencoderKL

    if setup.modules.vae.dtype == setup.dtype:
        return setup.modules
    vae: Any = AutoencoderKL.from_pretrained(setup.files.path / "vae", torch_dtype=setup.dtype)
    vae.eval().requires_grad_(False).to(setup.machine.device)
    return replace(setup.modules, vae=vae)


def run_diffusers(setup: Setup, row: RunnerRow, budget_ends: float) -> None:
    """Warm up and time diffusers' StableDiffusionXLPipeline over the shared modules."""
    from kiln_server.pipeline.reference import DiffusersReference

    reference = DiffusersReference(setup.files, diffusers_modules(setup))

    def run(params: Any) -> list[Any]:
        return diffusers_generate(reference, setup.clock, params)

    started = time.perf_counter()
    run(setup.request(-1))
    setup.clock.sync()
    row.warm_up = time.perf_counter() - started
    say(f"  diffusers: warm-up {row.warm_up:.1f} s")
    timed_runs(setup, row, run, budget_ends)


def warm_up_kiln(setup: Setup, pipeline: Any, unet_rows: Sequence[int] = ()) -> float:
    """The server's warm-up of `pipeline` (kiln_server.runtime.warm_up); its seconds."""
    from kiln_server.runtime import LoadedModel, warm_up

    started = time.perf_counter()
    warm_up(LoadedModel(spec=setup.spec, pipeline=pipeline), unet_rows)
    setup.clock.sync()
    return time.perf_counter() - started


def run_kiln(setup: Setup, row: RunnerRow, pipeline: Any, budget_ends: float) -> None:
    """Warm up and time Kiln's pipeline."""
    row.warm_up = warm_up_kiln(setup, pipeline)
    say(f"  {row.variant.key}: warm-up {row.warm_up:.1f} s")

    def run(params: Any) -> list[Any]:
        return kiln_generate(pipeline, setup.clock, params)

    timed_runs(setup, row, run, budget_ends)


def measure_preview(setup: Setup, pipeline: Any, pairs: int, method: str) -> PreviewCost:
    """Medians of a step alone and of a step plus a `method` preview, interleaved on one
    request."""
    from kiln_server.pipeline.params import PreviewParams

    clock = setup.clock
    options = PreviewParams(every_n_steps=1, method=method)
    params = setup.request(-2, num_inference_steps=2 * pairs + 2, preview=options)
    state = pipeline.prepare(params)
    size = pipeline.preview_size(state, options)
    for _ in range(2):  # warm: the preview's kernels and the encoder's first call
        pipeline.denoise_step([state])
        pipeline.preview(state, options)
    cost = PreviewCost(method=method, pairs=pairs)
    alone, with_preview, encode = [], [], []
    for _ in range(pairs):
        clock.sync()
        started = time.perf_counter()
        pipeline.denoise_step([state])
        clock.sync()
        alone.append(time.perf_counter() - started)
        started = time.perf_counter()
        pipeline.denoise_step([state])
        host = pipeline.preview_pixels(state, method, size).cpu().numpy()
        copied = time.perf_counter()
        pipeline.previewer.encode(host, size, options.format, options.quality)
        done = time.perf_counter()
        with_preview.append(done - started)
        encode.append(done - copied)
    cost.step, cost.step_with_preview, cost.encode = (
        median(alone),
        median(with_preview),
        median(encode),
    )
    cost.status = "ok"
    return cost


def measure_batcher(
    setup: Setup,
    pipeline: Any,
    results: Sequence[BatcherRow],
    rows_cap: int,
    max_waves: int,
    budget: float,
    deadline: Deadline,
) -> None:
    """Images per second through the batcher at each row's concurrency, in waves of
    requests; fills `results` as it goes (the deadline's report shows what was done)."""
    from kiln_server.batcher import Batcher, BatcherSettings, Job
    from kiln_server.events import Failed, Finished

    clock = setup.clock
    name = setup.spec.name
    batcher = Batcher(
        {name: pipeline},
        BatcherSettings(max_batch_rows={name: rows_cap}, default_max_batch_rows=rows_cap),
    )
    done: queue.SimpleQueue[Any] = queue.SimpleQueue()
    counter = iter(range(10_000, 1_000_000))

    def wave(concurrency: int, **overrides: Any) -> float:
        """Submit `concurrency` requests at once; the seconds until all have finished."""
        started = time.perf_counter()
        for _ in range(concurrency):
            index = next(counter)
            batcher.submit(
                Job(
                    f"gpu-bench-{index}",
                    setup.request(index, **overrides),
                    lambda event: done.put(event) if isinstance(event, Finished | Failed) else None,
                )
            )
        for _ in range(concurrency):
            event = done.get(timeout=max(deadline.left(), 1.0))
            if isinstance(event, Failed):
                raise RuntimeError(f"a request failed: {event.code} {event.message}")
        return time.perf_counter() - started

    level_budget = budget / max(len(results), 1)
    batcher.start()
    try:
        for row in results:
            try:
                # Untimed: a short wave pays each new batch shape's first-call costs.
                wave(row.concurrency, num_inference_steps=2)
                clock.reset_peak()
                steps_before, rows_before = batcher.stats.steps, batcher.stats.rows
                began = time.perf_counter()
                while row.waves < max_waves:
                    seconds = wave(row.concurrency)
                    row.waves += 1
                    row.seconds += seconds
                    row.images += row.concurrency
                    say(f"  batcher x{row.concurrency}: wave {row.waves}: {seconds:.2f} s")
                    used = time.perf_counter() - began
                    if used + seconds > level_budget or deadline.left() < seconds + 5:
                        break
                steps = batcher.stats.steps - steps_before
                row.mean_rows = (batcher.stats.rows - rows_before) / steps if steps else 0.0
                row.peak_gib = clock.peak_gib()
                row.status = "ok"
            except Exception as exc:
                row.status = f"failed: {short_error(exc)}"
                say(f"  batcher x{row.concurrency} failed:\n{traceback.format_exc()}")
                break
    finally:
        batcher.stop()


# ----- the run -----


@contextmanager
def phase(report: Report, name: str) -> Iterator[None]:
    """Announce a phase on stderr and add its seconds to the report's timeline."""
    report.phase = name
    say(f"{name} ...")
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - started
        report.timeline.append((name, seconds))
        say(f"{name}: {seconds:.1f} s")


def prepare_model(args: argparse.Namespace, device: torch.device) -> tuple[Path, str]:
    """The model folder to measure and a line saying where it came from."""
    if args.model_path is not None:
        return args.model_path, f"Model folder `{args.model_path}`."
    models_dir = args.cache_dir / "models"
    if args.smoke:
        from kiln_server.models.tiny_sdxl import TINY_SDXL_NAME, ensure_tiny_sdxl

        return ensure_tiny_sdxl(models_dir), f"Model `{TINY_SDXL_NAME}` (small, random weights)."
    from kiln_server.models.sdxl_base_arch import (
        SDXL_BASE_ARCH_NAME,
        ensure_sdxl_base_arch,
        is_current,
    )

    cached = is_current(models_dir / SDXL_BASE_ARCH_NAME)
    started = time.perf_counter()
    path = ensure_sdxl_base_arch(models_dir, device)
    how = (
        f"found in {models_dir}"
        if cached
        else f"generated on {device} into {models_dir} in {time.perf_counter() - started:.1f} s"
    )
    return path, (
        f"Model `{SDXL_BASE_ARCH_NAME}` (SDXL base 1.0's architecture, random fp16 weights: "
        f"draws noise), {how}."
    )


def parse_budgets(
    parser: argparse.ArgumentParser, items: Sequence[str], defaults: dict[str, float]
) -> dict[str, float]:
    """`--budget PHASE=SECONDS` items over the defaults; a usage error names a bad one."""
    budgets = dict(defaults)
    for item in items:
        key, _, value = item.partition("=")
        if key not in budgets:
            parser.error(f"--budget {item}: the phases are {', '.join(budgets)}")
        try:
            budgets[key] = float(value)
        except ValueError:
            parser.error(f"--budget {item}: {value!r} is not a number of seconds")
    return budgets


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="run on the CPU with kiln-tiny-sdxl in seconds (compile and CUDA graphs skipped)",
    )
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N (default: cuda)")
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("KILN_CACHE_DIR") or DEFAULT_CACHE_DIR),
        help=f"where the generated model is kept (default: $KILN_CACHE_DIR or {DEFAULT_CACHE_DIR})",
    )
    parser.add_argument(
        "--model-path", type=Path, help="measure this SDXL folder (diffusers layout) instead"
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANT_KEYS),
        help=f"comma-separated runners, in run order (default: {','.join(VARIANT_KEYS)})",
    )
    parser.add_argument("--size", type=int, help="width and height (default: 1024; smoke: 64)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: 30; smoke: 4)")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--scheduler", default="K_EULER")
    parser.add_argument("--repeats", type=int, help="timed runs per runner (default: 3; smoke: 2)")
    parser.add_argument(
        "--batcher-levels",
        type=int,
        nargs="*",
        default=[1, 4, 8],
        help="concurrent requests to measure (none: skip the batcher)",
    )
    parser.add_argument("--batcher-variant", choices=BATCHER_VARIANTS, default="plain")
    parser.add_argument("--batcher-waves", type=int, default=2, help="timed waves per level")
    parser.add_argument(
        "--max-batch-rows", type=int, help="UNet rows per step (default: the server's)"
    )
    parser.add_argument("--preview-pairs", type=int, help="preview samples (default: 10; smoke: 3)")
    parser.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="PHASE=SECONDS",
        help="a phase's time budget; phases: " + ", ".join(GPU_BUDGETS),
    )
    parser.add_argument(
        "--deadline", type=float, help="seconds for the whole run (default: 450; smoke: 240)"
    )
    parser.add_argument(
        "--write-results",
        action="store_true",
        help="replace this benchmark's section of benchmarks/RESULTS.md (GPU runs only)",
    )
    parser.add_argument("--results-file", type=Path, help="write the section to this file")
    args = parser.parse_args(argv)
    variants = [key.strip() for key in args.variants.split(",") if key.strip()]
    unknown = [key for key in variants if key not in VARIANT_KEYS]
    if unknown:
        parser.error(
            f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANT_KEYS)}"
        )
    args.variants = variants
    if args.smoke and args.write_results:
        parser.error("--write-results is for GPU runs; give a smoke run --results-file FILE")
    smoke = args.smoke
    args.size = args.size or (0 if smoke else 1024)  # 0: the model's default size
    args.steps = args.steps or (4 if smoke else 30)
    args.repeats = args.repeats or (2 if smoke else 3)
    args.preview_pairs = args.preview_pairs or (3 if smoke else 10)
    args.deadline = args.deadline or (240.0 if smoke else 450.0)
    args.budgets = parse_budgets(parser, args.budget, SMOKE_BUDGETS if smoke else GPU_BUDGETS)
    return args


def command_line(argv: Sequence[str] | None) -> str:
    """The command as run, from the repository root (the interpreter relative to it when
    it lives there, as .venv/bin/python does)."""
    repo = Path(__file__).resolve().parents[1]
    python = Path(sys.executable)
    shown = str(python.relative_to(repo)) if python.is_relative_to(repo) else python.name
    words = list(sys.argv[1:] if argv is None else argv)
    return " ".join([shown, "benchmarks/gpu.py", *words])


class Benchmark:
    """One run: loads the model once, then runs each phase within its budget and the
    deadline, and reports (at the end, or at the deadline)."""

    def __init__(self, args: argparse.Namespace, device: torch.device, command: str) -> None:
        self.args = args
        self.device = device
        self.machine = Machine.probe(device)
        self.clock = Clock(device)
        self.report = Report(self.machine, command, args.smoke, args.deadline)
        self._emitted = threading.Lock()
        self.deadline = Deadline(args.deadline, self.finish)

    def finish(self, reason: str) -> None:
        """Print (and write) the report once. At the deadline (`reason` "deadline") the
        process then exits with status 3, whatever the main thread is doing."""
        if not self._emitted.acquire(blocking=False):
            return
        report, args = self.report, self.args
        if reason == "deadline":
            report.interrupted = report.phase
            say(f"deadline of {args.deadline:g} s reached during {report.phase}")
        section = report.render()
        print(section, flush=True)
        if args.results_file is not None:
            write_section(SECTION, section, args.results_file)
            say(f"wrote {args.results_file}")
        if args.write_results:
            write_section(SECTION, section)
            say("wrote benchmarks/RESULTS.md")
        if reason == "deadline":
            sys.stderr.flush()
            os._exit(3)

    def load(self) -> Setup:
        """Generate (or find) the model, load it onto the device, count its UNet FLOPs."""
        from kiln_server.engines.torch_engine import vae_dtype
        from kiln_server.models.loader import load_modules, read_model_files
        from kiln_server.models.registry import make_spec

        args, report, device = self.args, self.report, self.device
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        if device.type == "cpu":
            dtype = torch.float32  # the CPU lacks fast half-precision kernels
        with phase(report, "model"):
            path, report.model_line = prepare_model(args, device)
        files = read_model_files(path)
        # The measured request becomes the model's default, so the server's warm-up warms
        # exactly its shapes.
        defaults: dict[str, Any] = {
            "default_num_inference_steps": args.steps,
            "default_guidance_scale": args.guidance,
            "default_scheduler": args.scheduler,
        }
        if args.size:
            defaults.update(default_width=args.size, default_height=args.size)
        with phase(report, "load"):
            started = time.perf_counter()
            modules = load_modules(path, dtype, vae_dtype(dtype, files.vae_force_upcast))
            for module in (modules.unet, modules.text_encoder, modules.text_encoder_2, modules.vae):
                module.to(device)
            self.clock.sync()
            report.model_line += f" Loaded onto {device} in {time.perf_counter() - started:.1f} s."
        setup = Setup(
            spec=make_spec(path.name, path, defaults),
            files=files,
            modules=modules,
            machine=self.machine,
            clock=self.clock,
            dtype=dtype,
            repeats=args.repeats,
        )
        params = setup.request(0)
        attention = sorted({type(p).__name__ for p in modules.unet.attn_processors.values()})
        report.request_line = (
            f"Request: {params.width}x{params.height}, {params.num_inference_steps} steps, "
            f"guidance {params.guidance_scale:g}, {params.scheduler}, {params.num_outputs} "
            "image, a new prompt and seed per run, CPU generators; UNet and text encoders "
            f"{dtype_label(dtype)}, VAE {dtype_label(modules.vae.dtype)}; attention "
            f"{', '.join(attention)}; median of up to {args.repeats} timed runs per runner."
        )
        with phase(report, "flops"):
            rows = params.num_outputs * (2 if params.do_classifier_free_guidance else 1)
            scale = files.dims.vae_scale_factor
            latent = (params.height // scale, params.width // scale)
            config = json.loads((path / "unet" / "config.json").read_text())
            per_row = unet_flops(
                config,
                1,
                *latent,
                tokens=files.dims.max_tokens,
                pooled_dim=files.dims.pooled_dim,
                num_time_ids=files.dims.num_time_ids,
            )
            report.unet_flops = per_row * rows
            report.request_rows = rows
        peak = self.machine.peak
        report.flops_line = (
            f"UNet FLOPs per iteration: {per_row * rows / 1e12:.3g} TFLOP ({rows} rows of "
            f"{per_row / 1e12:.3g} TFLOP at {latent[0]}x{latent[1]} latents; torch's "
            "FlopCounterMode on meta tensors, as benchmarks/backends.py counts); dense "
            f"fp16/bf16 peak of {self.machine.name}: "
            + (f"{peak:g} TFLOP/s." if peak else "not in the table.")
        )
        return setup

    def skip_reason(self, variant: Variant) -> str | None:
        """Why `variant` does not run here, or None."""
        budget = self.args.budgets[variant.key]
        if variant.cuda_graphs and self.device.type != "cuda":
            return "skipped: needs CUDA"
        if variant.compile and self.args.smoke:
            return "skipped: --smoke (compiling takes minutes)"
        if self.deadline.left() < budget:
            left = self.deadline.left()
            return f"skipped: {left:.0f} s left before the deadline, budget {budget:g} s"
        return None

    def run_variant(self, setup: Setup, row: RunnerRow) -> Any:
        """Measure one runner; returns its Kiln pipeline when it is the plain one (the
        preview and batcher phases reuse it), else None."""
        variant = row.variant
        reason = self.skip_reason(variant)
        if reason is not None:
            row.status = reason
            say(f"{variant.key}: {reason}")
            return None
        with phase(self.report, variant.key):
            budget_ends = time.perf_counter() + self.args.budgets[variant.key]
            pipeline = None
            try:
                if variant.key == "diffusers":
                    run_diffusers(setup, row, budget_ends)
                else:
                    pipeline = kiln_pipeline(setup, variant)
                    run_kiln(setup, row, pipeline, budget_ends)
            except Exception as exc:
                row.status = f"failed: {short_error(exc)}"
                say(f"{variant.key} failed:\n{traceback.format_exc()}")
                pipeline = None
            self.clock.free()
        return pipeline if variant.key == "plain" else None

    def run_preview(self, setup: Setup, plain: Any) -> None:
        """The preview's cost per step, on the plain pipeline."""
        report = self.report
        if plain is None:
            report.previews = [PreviewCost(status="not run: needs the plain variant")]
            return
        report.previews = []
        for method in plain.limits.preview_methods:
            with phase(report, f"preview ({method})"):
                try:
                    cost = measure_preview(setup, plain, self.args.preview_pairs, method)
                except Exception as exc:
                    cost = PreviewCost(method=method, status=f"failed: {short_error(exc)}")
                    say(f"preview ({method}) failed:\n{traceback.format_exc()}")
                report.previews.append(cost)

    def run_batcher(self, setup: Setup, plain: Any) -> None:
        """The batcher's throughput levels on the chosen Kiln variant, within its budget."""
        args, report = self.args, self.report
        budget = args.budgets["batcher"]
        variant = next(v for v in VARIANTS if v.key == args.batcher_variant)
        reason = None
        if variant.cuda_graphs and self.device.type != "cuda":
            reason = "skipped: needs CUDA"
        elif self.deadline.left() < budget:
            reason = f"skipped: {self.deadline.left():.0f} s left, budget {budget:g} s"
        if reason is not None:
            for level in report.batcher:
                level.status = reason
            say(f"batcher: {reason}")
            return
        with phase(report, "batcher"):
            pipeline = plain if variant.key == "plain" else None
            try:
                if pipeline is None:
                    pipeline = kiln_pipeline(setup, variant)
                    rows: Sequence[int] = ()
                    if variant.cuda_graphs:  # as the server does: capture every batch size
                        rows = range(1, report.batcher_rows_cap + 1)
                    warm_up_kiln(setup, pipeline, rows)
                measure_batcher(
                    setup,
                    pipeline,
                    report.batcher,
                    report.batcher_rows_cap,
                    args.batcher_waves,
                    budget,
                    self.deadline,
                )
            except Exception as exc:
                for level in report.batcher:
                    level.status = f"failed: {short_error(exc)}"
                say(f"batcher failed:\n{traceback.format_exc()}")
            del pipeline
            self.clock.free()

    def run(self) -> int:
        """Every phase in order; 0 when nothing that ran failed, else 1."""
        from kiln_server.settings import ServerSettings

        args, report = self.args, self.report
        say(self.machine.details)
        setup = self.load()
        by_key = {v.key: v for v in VARIANTS}
        report.runners = [RunnerRow(by_key[key]) for key in args.variants]
        report.batcher = [BatcherRow(level) for level in args.batcher_levels]
        report.batcher_variant = args.batcher_variant
        report.batcher_rows_cap = args.max_batch_rows or ServerSettings().max_batch_rows
        if args.max_batch_rows:
            report.batcher_rows_source = "--max-batch-rows"
        batcher_done = not args.batcher_levels
        for row in report.runners:
            plain = self.run_variant(setup, row)
            if row.variant.key == "plain":
                self.run_preview(setup, plain)
                if not batcher_done:
                    self.run_batcher(setup, plain)
                    batcher_done = True
                del plain
                self.clock.free()
        if not batcher_done:
            self.run_batcher(setup, None)
        if "plain" not in args.variants:
            report.previews = [PreviewCost(status="not run: needs the plain variant")]
        self.deadline.cancel()
        self.finish("done")
        statuses = [r.status for r in report.runners] + [r.status for r in report.batcher]
        statuses += [cost.status for cost in report.previews]
        return 1 if any(status.startswith("failed") for status in statuses) else 0


def dtype_label(dtype: torch.dtype) -> str:
    """torch.float16 as 'float16'."""
    return str(dtype).removeprefix("torch.")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark: 0 when everything that ran succeeded, 1 when something failed,
    2 without a CUDA GPU (unless --smoke), 3 when stopped at the deadline."""
    from kiln_server.engines.device import bind_thread, cuda_available, resolve_device

    args = parse_args(argv)
    if not args.smoke and not cuda_available():
        why = "a CPU-only build" if not torch.backends.cuda.is_built() else "no visible GPU"
        print(
            f"benchmarks/gpu.py needs a CUDA GPU (torch {torch.__version__}: {why}); "
            "run it on a GPU host, or pass --smoke for the CPU smoke run",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cpu") if args.smoke else resolve_device(args.device)
    bind_thread(device)  # CUDA events record on the current device's stream
    if device.type == "cpu":
        # The small model's tensors are too small for intra-op threads to pay off; on a few
        # shared cores they mostly wait on one another.
        torch.set_num_threads(1)
    return Benchmark(args, device, command_line(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
