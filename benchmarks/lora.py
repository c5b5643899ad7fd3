"""LoRAs through a real server: first-use latency, mixed-batch step cost, mixed concurrency.

    .venv/bin/python benchmarks/lora.py [--model kiln-shapes|DIR] [--config kiln.toml]
        [--device cpu|cuda] [--backend torch --engines DIR] [--rank 16] [--format kohya|peft]
        [--first-use 8] [--batch-rounds 3] [--clients 8] [--requests-per-client 4]
        [--throughput-rounds 2] [--json FILE] [--results]

Starts one `kiln serve` (the model's [[models]] entry, with `max_batch_rows`
`--max-batch-rows` and a temporary LoRA folder added to its `lora_dirs`) and writes
2 x `--first-use` + 4 LoRAs of rank `--rank` into that folder, random weights on every
attention projection the LoRA benchmarks target (lora_rows.TARGETS), sized from the UNet's
safetensors headers, in kohya or PEFT layout. The model folder's own `loras/` (the shipped
`closeup` of kiln-shapes) is served too. Requests go one at a time unless said otherwise,
all at the model's default size, one image each.

(a) First use. For each first-use LoRA, three requests in a rotating order: no LoRA, a
    resident LoRA (`closeup` when the model ships it, else a generated one, made resident
    during warm-up) and the LoRA never asked for before; `--first-use` LoRAs on an idle
    server, then `--first-use` more with each of the three requests sent while a request
    with no LoRA runs (after its first step), so it joins a running batch, as a LoRA
    asked for on a server in use does. Measured on the client: seconds from sending to
    the `started` event (admitted, after prompt encoding) and to the first `progress`
    event (step 1 done). Server side, from its JSON log: seconds from the API
    process logging the request as submitted to the engine core logging the file as read
    (the LoRA is installed into a slot at the next step boundary), and each request's
    `queue_seconds` (arrival to admission, which for a first use includes the read).
(b) Step cost. `lora_rows.REQUESTS` (8) requests sent at once, two each with 4 resident
    LoRAs, against the same 8 with none, alternating over `--batch-rounds` rounds after a
    warm-up round of each. Per-step seconds are the gaps between one request's consecutive
    progress events while all 8 are in the batch (from the last one's first step to the
    first one's last step), median over every such gap. Beside it, benchmarks/lora_rows.py
    is run for the same model, rank and rows: the torch UNet call alone, without a
    server (whatever `--backend` the server runs).
(c) Throughput. `--clients` concurrent clients, each sending `--requests-per-client`
    requests one after another; mixed: each request has one of the 4 LoRAs (scales 0.5 to
    1.25) or none, in turn; plain: none. `--throughput-rounds` runs of each, alternating
    which goes first. Images per second over the runs, p50 and p95 latency.

The goals of issue #12 (a new LoRA running within 200 ms of its request, median of the
first uses, idle and busy; a mixed batch step at most 1.15x the plain one, through the
server and for one UNet call; mixed concurrency at least 0.8x plain throughput) are
printed with pass/fail. Any failed request stops the benchmark.
`--json FILE` writes every number; `--results` (or `--write-results`) replaces this
benchmark's section of benchmarks/RESULTS.md (or of `--results-file`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from load import PROMPTS, percentile
from lora_rows import REQUESTS, TARGETS
from results_file import RESULTS, cpu_name, write_section
from safetensors.torch import save_file

from kiln_client import build_request
from kiln_client.aio import AsyncKilnClient
from kiln_client.errors import KilnError
from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_server.atomic_files import write_atomic
from kiln_server.config_file import SettingsError, read_config_file
from kiln_server.local import LocalServer, start_local_server
from kiln_server.lora.listing import HeaderError, LoraListing, describe, read_header
from kiln_server.lora.policy import refusal_for_backend
from kiln_server.models.registry import (
    ModelRegistry,
    ModelSpec,
    RegistryError,
    default_builtin_name,
    default_cache_dir,
)

SECTION = "## LoRAs: first use, mixed-batch step cost, mixed concurrency (benchmarks/lora.py)"
BENCHMARKS = Path(__file__).resolve().parent
GOAL_FIRST_USE_SECONDS = 0.2
GOAL_STEP_RATIO = 1.15
GOAL_THROUGHPUT_RATIO = 0.8
MIXED_LORAS = 4
MIXED_SCALES = (1.0, 0.5, 0.75, 1.25)
SHIPPED_LORA = "closeup"
# Entry keys the benchmark sets itself (paths made absolute, its LoRA folder added).
OWN_KEYS = ("name", "path", "builtin", "preview_decoder", "lora_dirs", "max_batch_rows")
# [server] settings of a --config left out: the benchmark's own plain-text client on
# loopback must reach the server without tokens or TLS, on the port the kernel picks.
SERVER_KEYS_LEFT_OUT = (
    "default_model",
    "host",
    "port",
    "metrics_port",
    "health_port",
    "api_tokens",
    "api_tokens_file",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
)


class BenchmarkError(RuntimeError):
    """The benchmark cannot run or a measurement is impossible; the message says why."""


@dataclass(frozen=True)
class Setup:
    """What is served: the model, the config written for it and the LoRAs it can apply."""

    spec: ModelSpec
    config: Path
    lora_dir: Path
    # LoRAs first asked for on an idle server, and beside a running request.
    first_use: tuple[str, ...]
    first_use_busy: tuple[str, ...]
    mixed: tuple[str, ...]
    resident: str
    max_lora_rank: int
    # The --config [server] settings served (flags given to the benchmark win over them).
    server_settings: dict[str, Any]


@dataclass
class Timing:
    """One request as its client saw it (perf_counter seconds) and its completed event."""

    request_id: str
    loras: tuple[tuple[str, float], ...]
    sent: float
    started: float = 0.0
    progress: dict[int, float] = field(default_factory=dict)
    ended: float = 0.0
    images: int = 0
    queue_seconds: float = 0.0

    @property
    def to_started(self) -> float:
        """Seconds from sending to the `started` event."""
        return self.started - self.sent

    @property
    def to_first_step(self) -> float:
        """Seconds from sending to the first `progress` event."""
        return self.progress[min(self.progress)] - self.sent

    @property
    def latency(self) -> float:
        """Seconds from sending to the end of the stream."""
        return self.ended - self.sent


@dataclass(frozen=True)
class Summary:
    """Median and max of some seconds, and how many there were."""

    median: float
    max: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        """The summary of `values` (at least one)."""
        return cls(statistics.median(values), max(values), len(values))


@dataclass(frozen=True)
class FirstUse:
    """(a): per kind of request, seconds to `started` and to step 1; the first uses' extra
    over a resident LoRA; and the server's own part of a first use. `busy`: each request
    was sent while another (no LoRA) was running, so it joins a running batch."""

    busy: bool
    resident_lora: str
    none_to_started: Summary
    none_to_first_step: Summary
    resident_to_started: Summary
    resident_to_first_step: Summary
    first_use_to_started: Summary
    first_use_to_first_step: Summary
    # Each first use minus the median of the resident-LoRA requests.
    extra_over_resident: Summary
    # Server log: request submitted (API process) -> "LoRA read" (engine core).
    server_read: Summary
    # `queue_seconds` of the completed events.
    first_use_queue: Summary
    resident_queue: Summary


@dataclass(frozen=True)
class StepCost:
    """(b): median seconds per step of the mixed and the plain batch, through the server
    (`*_steps`: gaps measured) and for one UNet call (lora_rows.py)."""

    server_mixed: float
    server_plain: float
    server_mixed_steps: int
    server_plain_steps: int
    unet_plain: float
    unet_installed: float
    unet_mixed: float

    @property
    def server_ratio(self) -> float:
        """Mixed over plain step seconds through the server."""
        return self.server_mixed / self.server_plain

    @property
    def unet_ratio(self) -> float:
        """Mixed over plain seconds of one UNet call."""
        return self.unet_mixed / self.unet_plain


@dataclass(frozen=True)
class Throughput:
    """(c): the closed-loop runs of one workload, summed (requests, images, seconds) and
    their latency percentiles."""

    requests: int
    images: int
    seconds: float
    p50: float
    p95: float

    @property
    def images_per_second(self) -> float:
        """Images over the run's wall-clock seconds."""
        return self.images / self.seconds


@dataclass(frozen=True)
class Goal:
    """One goal of the issue, what was measured against it, and whether it was met."""

    name: str
    measured: float
    target: float
    at_most: bool
    unit: str  # "s" (seconds) or "x" (a ratio)
    worst: float | None = None  # the max, where `measured` is a median

    @property
    def passed(self) -> bool:
        """Whether `measured` is within `target`."""
        return self.measured <= self.target if self.at_most else self.measured >= self.target


# --- the served model and its LoRAs ---------------------------------------------------


def model_entry(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ([server] table, [[models]] entry) of the model to serve, from `--config` or
    from `--model` (a built-in name or a diffusers folder)."""
    if args.config is None:
        folder = Path(args.model).expanduser()
        if folder.is_dir():
            return {}, {"name": folder.resolve().name, "path": str(folder.resolve())}
        if os.sep in args.model:
            raise BenchmarkError(
                f"--model: {folder} is no folder; pass a diffusers SDXL folder or a built-in "
                "model name"
            )
        return {}, {"name": args.model, "builtin": args.model}
    try:
        config = read_config_file(args.config)
    except SettingsError as error:
        raise BenchmarkError(f"--config: {error}") from None
    entries = [e for e in config.get("models") or [] if isinstance(e, dict)]
    server = dict(config.get("server") or {})
    wanted = args.model or server.get("default_model") or (entries[0]["name"] if entries else "")
    entry = next((e for e in entries if e.get("name") == wanted), None)
    if entry is None:
        names = sorted(str(e.get("name")) for e in entries)
        raise BenchmarkError(
            f"--config: {args.config} has no [[models]] entry named {wanted!r} (it has "
            f"{names}); pass --model NAME of one of them"
        )
    kept = {k: v for k, v in server.items() if k not in SERVER_KEYS_LEFT_OUT}
    return {**kept, "_config_dir": config["_config_dir"]}, dict(entry)


def resolve_spec(server: dict[str, Any], entry: dict[str, Any], cache_dir: Path) -> ModelSpec:
    """The model's spec, resolved as the server resolves it (paths, built-ins)."""
    config = {"models": [entry], "_config_dir": server.get("_config_dir", ".")}
    try:
        return next(iter(ModelRegistry.from_config(config, cache_dir).models.values()))
    except RegistryError as error:
        raise BenchmarkError(f"--model/--config: {error}") from None


def toml_value(value: Any, where: str) -> str:
    """`value` as TOML: strings, numbers, booleans and lists of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # JSON's escapes are TOML basic-string escapes
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item, where) for item in value) + "]"
    raise BenchmarkError(
        f"--config: {where} is a {type(value).__name__}; the benchmark copies only strings, "
        "numbers, booleans and lists of them into the config it serves"
    )


def write_config(
    path: Path,
    server: dict[str, Any],
    entry: dict[str, Any],
    spec: ModelSpec,
    lora_dir: Path,
    max_batch_rows: int,
) -> None:
    """The served config: `server` and `entry` with absolute paths, `lora_dir` first among
    the LoRA folders and the benchmark's batch cap."""
    lines = ["[server]", f"default_model = {toml_value(spec.name, 'default_model')}"]
    lines += [
        f"{key} = {toml_value(value, f'server.{key}')}"
        for key, value in server.items()
        if not key.startswith("_")
    ]
    own: dict[str, Any] = {
        "name": spec.name,
        "path": spec.path,
        "lora_dirs": [lora_dir, *spec.lora_dirs],
        "max_batch_rows": max_batch_rows,
    }
    if spec.preview_decoder is not None:
        own["preview_decoder"] = spec.preview_decoder
    values = {**{k: v for k, v in entry.items() if k not in OWN_KEYS}, **own}
    lines += ["", "[[models]]"]
    lines += [f"{key} = {toml_value(value, f'models.{key}')}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    tomllib.loads(path.read_text())  # what the server will parse


def attention_shapes(model: Path) -> dict[str, tuple[int, int]]:
    """(out, in) features of every attention projection the LoRAs target, by diffusers
    module name, from the headers of the UNet's .safetensors files (no weights read)."""
    files = sorted((model / "unet").glob("*.safetensors"))
    if not files:
        raise BenchmarkError(
            f"--model: {model / 'unet'} has no .safetensors weights to size the LoRAs from"
        )
    shapes: dict[str, tuple[int, int]] = {}
    for file in files:
        try:
            header = read_header(file)
        except (OSError, HeaderError) as error:
            raise BenchmarkError(
                f"--model: {file} is not a readable .safetensors file: {error}"
            ) from None
        for key, shape in header.items():
            module = key.removesuffix(".weight")
            if key.endswith(".weight") and module.endswith(TARGETS) and len(shape) == 2:
                shapes[module] = (shape[0], shape[1])
    if not shapes:
        raise BenchmarkError(f"--model: {model / 'unet'} has no attention projections {TARGETS}")
    return shapes


def write_lora(
    path: Path, shapes: dict[str, tuple[int, int]], rank: int, seed: int, layout: str
) -> None:
    """A rank-`rank` LoRA on every module of `shapes`: random fp16 weights, scale 1 (kohya
    alpha = rank; PEFT without metadata, which diffusers reads as alpha = r)."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for module, (out_features, in_features) in sorted(shapes.items()):
        down = (torch.randn(rank, in_features, generator=generator) * 0.01).half()
        up = (torch.randn(out_features, rank, generator=generator) * 0.01).half()
        if layout == "kohya":
            key = "lora_unet_" + module.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
        else:
            tensors[f"unet.{module}.lora_A.weight"] = down
            tensors[f"unet.{module}.lora_B.weight"] = up
    save_file(tensors, str(path))


def shipped_lora(spec: ModelSpec) -> LoraListing | None:
    """The model folder's own `closeup` LoRA, when it ships one."""
    path = spec.path / "loras" / f"{SHIPPED_LORA}.safetensors"
    if not path.is_file():
        return None
    listing = describe(path, SHIPPED_LORA, max_rank=2**31)
    if isinstance(listing, str):
        raise BenchmarkError(f"the shipped LoRA {path} cannot be served: {listing}")
    return listing


def prepare(args: argparse.Namespace, workdir: Path) -> Setup:
    """Write the LoRAs and the config; resolve what the server will serve."""
    cache_dir = args.cache_dir or default_cache_dir()
    server, entry = model_entry(args)
    spec = resolve_spec(server, entry, cache_dir)
    shipped = shipped_lora(spec)
    highest = max(args.rank, shipped.rank if shipped else 0)
    max_rank = args.max_lora_rank or highest
    if max_rank < highest:
        raise BenchmarkError(
            f"--max-lora-rank {max_rank} is below the rank {highest} of the LoRAs served "
            f"(--rank {args.rank}{', the shipped ' + SHIPPED_LORA if shipped else ''}); "
            "raise it or pass 0 (the highest rank served)"
        )
    shapes = attention_shapes(spec.path)
    lora_dir = workdir / "loras"
    lora_dir.mkdir()
    first_use = tuple(f"first-use-{index}" for index in range(args.first_use))
    first_use_busy = tuple(f"first-use-busy-{index}" for index in range(args.first_use))
    mixed = tuple(f"mixed-{index}" for index in range(MIXED_LORAS))
    for seed, name in enumerate(mixed + first_use + first_use_busy):
        write_lora(lora_dir / f"{name}.safetensors", shapes, args.rank, seed, args.format)
    config = workdir / "kiln.toml"
    write_config(config, server, entry, spec, lora_dir, args.max_batch_rows)
    resident = SHIPPED_LORA if shipped else mixed[0]
    settings = {k: v for k, v in server.items() if not k.startswith("_")}
    return Setup(
        spec, config, lora_dir, first_use, first_use_busy, mixed, resident, max_rank, settings
    )


def start_server(args: argparse.Namespace, setup: Setup, workdir: Path) -> LocalServer:
    """`kiln serve` with the written config and the benchmark's LoRA settings, SERVING."""
    flags = ["--config", str(setup.config), "--max-queue", "256"]
    flags += ["--intra-op-threads", str(args.intra_op_threads)]
    flags += ["--lora-slots", str(args.lora_slots), "--max-lora-rank", str(setup.max_lora_rank)]
    for name in ("backend", "engines", "device", "dtype", "cache_dir"):
        value = getattr(args, name)
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    try:
        return start_local_server(workdir / "server", *flags, timeout=args.start_timeout)
    except RuntimeError as error:
        tail = "\n".join(str(error).splitlines()[-10:])
        raise BenchmarkError(f"kiln serve {shlex.join(flags)} did not start:\n{tail}") from None


# --- requests -------------------------------------------------------------------------


def make_request(
    setup: Setup, args: argparse.Namespace, index: int, loras: Sequence[tuple[str, float]]
) -> pb.GenerateRequest:
    """The index-th request: one image, its own seed, the model's default size."""
    return build_request(
        PROMPTS[index % len(PROMPTS)],
        model=setup.spec.name,
        num_inference_steps=args.steps,
        seed=1000 + index,
        loras=list(loras) or None,
    )


async def timed(
    client: AsyncKilnClient,
    request: pb.GenerateRequest,
    timeout: float,
    stepping: asyncio.Event | None = None,
) -> Timing:
    """Send `request` and time its events (setting `stepping` at its first step); a failed
    request raises `BenchmarkError`."""
    loras = tuple((lora.name, lora.scale) for lora in request.loras)
    timing = Timing(request_id="", loras=loras, sent=time.perf_counter())
    try:
        async for event in client.generate_events(request, timeout=timeout):
            now = time.perf_counter()
            timing.request_id = event.request_id or timing.request_id
            if event.HasField("started"):
                timing.started = now
            elif event.HasField("progress"):
                timing.progress.setdefault(event.progress.step, now)
                if stepping is not None:
                    stepping.set()
            elif event.HasField("image"):
                timing.images += 1
            elif event.HasField("completed"):
                timing.queue_seconds = event.completed.queue_seconds
    except KilnError as error:
        raise BenchmarkError(f"a request with loras {list(loras)} failed: {error}") from error
    timing.ended = time.perf_counter()
    if not timing.progress or not timing.started or not timing.images:
        raise BenchmarkError(f"request {timing.request_id} ended without steps or images")
    return timing


async def beside_running(
    client: AsyncKilnClient, setup: Setup, args: argparse.Namespace, request: pb.GenerateRequest
) -> Timing:
    """`request` sent once a request with no LoRA (as many steps) has run its first step,
    so it arrives while the engine is stepping; both run to the end."""
    stepping = asyncio.Event()
    background = make_request(setup, args, len(PROMPTS) - 1, ())
    running = asyncio.create_task(timed(client, background, args.request_timeout, stepping))
    waiting = asyncio.create_task(stepping.wait())
    await asyncio.wait([running, waiting], return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if not stepping.is_set():
        await running  # raises the background request's failure
        raise BenchmarkError("the background request of (a) ended without a step")
    timing = await timed(client, request, args.request_timeout)
    await running
    return timing


async def first_use(
    client: AsyncKilnClient, setup: Setup, args: argparse.Namespace, busy: bool
) -> list[dict[str, Timing]]:
    """(a): per first-use LoRA, a request with no LoRA, with the resident one and with
    the new one, in a rotating order; each alone on the server, or with `busy` each beside
    a running request."""
    rounds = []
    for index, name in enumerate(setup.first_use_busy if busy else setup.first_use):
        kinds: dict[str, tuple[tuple[str, float], ...]] = {
            "none": (),
            "resident": ((setup.resident, 1.0),),
            "first_use": ((name, 1.0),),
        }
        order = list(kinds)[index % 3 :] + list(kinds)[: index % 3]
        timings = {}
        for kind in order:
            request = make_request(setup, args, 0, kinds[kind])
            if busy:
                timings[kind] = await beside_running(client, setup, args, request)
            else:
                timings[kind] = await timed(client, request, args.request_timeout)
        rounds.append(timings)
    return rounds


def batch_loras(setup: Setup, mixed: bool) -> list[tuple[tuple[str, float], ...]]:
    """The LoRAs of each request of a (b) batch: two requests per mixed LoRA, or none."""
    per_lora = REQUESTS // MIXED_LORAS
    return [((setup.mixed[i // per_lora], 1.0),) if mixed else () for i in range(REQUESTS)]


async def batch(
    client: AsyncKilnClient, setup: Setup, args: argparse.Namespace, mixed: bool
) -> list[Timing]:
    """(b): the 8 requests of one batch, sent at once."""
    requests = [
        make_request(setup, args, index, loras)
        for index, loras in enumerate(batch_loras(setup, mixed))
    ]
    return list(await asyncio.gather(*(timed(client, r, args.request_timeout) for r in requests)))


def shared_step_gaps(timings: list[Timing]) -> list[float]:
    """Seconds between consecutive steps while every request of the batch was in it: the
    gaps between the progress events of the request admitted last, from its first step to
    the first step after which some request finished (its decode would count otherwise)."""
    last_admitted = max(timings, key=lambda t: t.progress[min(t.progress)])
    begin = last_admitted.progress[min(last_admitted.progress)]
    end = min(t.progress[max(t.progress)] for t in timings)
    times = sorted(t for t in last_admitted.progress.values() if begin <= t <= end)
    return [later - earlier for earlier, later in itertools.pairwise(times)]


async def step_cost_rounds(
    client: AsyncKilnClient, setup: Setup, args: argparse.Namespace
) -> tuple[list[float], list[float]]:
    """(b): step gaps of the mixed and the plain batches over `--batch-rounds` rounds,
    after one warm-up round of each (which also makes the 4 LoRAs resident)."""
    await batch(client, setup, args, mixed=True)
    await batch(client, setup, args, mixed=False)
    gaps: dict[bool, list[float]] = {True: [], False: []}
    for index in range(args.batch_rounds):
        for mixed in (True, False) if index % 2 == 0 else (False, True):
            gaps[mixed] += shared_step_gaps(await batch(client, setup, args, mixed))
    for mixed, found in gaps.items():
        if not found:
            raise BenchmarkError(
                f"the {'mixed' if mixed else 'plain'} batches of {REQUESTS} requests never "
                f"ran two steps all together: raise --steps (now {args.steps or 'default'}) "
                f"or --max-batch-rows (now {args.max_batch_rows}; {REQUESTS} requests under "
                f"guidance need {2 * REQUESTS})"
            )
    return gaps[True], gaps[False]


def mixed_loras(index: int, setup: Setup) -> tuple[tuple[str, float], ...]:
    """(c): request `index` of the mixed run has one of the 4 LoRAs or none, in turn."""
    choice = index % (MIXED_LORAS + 1)
    if choice == MIXED_LORAS:
        return ()
    return ((setup.mixed[choice], MIXED_SCALES[index % len(MIXED_SCALES)]),)


async def closed_loop(
    client: AsyncKilnClient, setup: Setup, args: argparse.Namespace, mixed: bool
) -> tuple[list[Timing], float]:
    """(c), one run: every client sends its requests one after another, all clients at
    once; the requests' timings and the run's seconds."""
    timings: list[Timing] = []

    async def one_client(number: int) -> None:
        for turn in range(args.requests_per_client):
            index = number * args.requests_per_client + turn
            loras = mixed_loras(index, setup) if mixed else ()
            request = make_request(setup, args, index, loras)
            timings.append(await timed(client, request, args.request_timeout))

    began = time.perf_counter()
    await asyncio.gather(*(one_client(number) for number in range(args.clients)))
    return timings, time.perf_counter() - began


async def throughput(
    client: AsyncKilnClient, setup: Setup, args: argparse.Namespace
) -> tuple[Throughput, Throughput]:
    """(c): (mixed, plain) over `--throughput-rounds` runs of each, alternating which goes
    first, so a drift in the machine's speed falls on both alike."""
    timings: dict[bool, list[Timing]] = {True: [], False: []}
    seconds = {True: 0.0, False: 0.0}
    for index in range(args.throughput_rounds):
        for mixed in (True, False) if index % 2 == 0 else (False, True):
            run, elapsed = await closed_loop(client, setup, args, mixed)
            timings[mixed] += run
            seconds[mixed] += elapsed

    def of(mixed: bool) -> Throughput:
        latencies = [t.latency for t in timings[mixed]]
        return Throughput(
            requests=len(latencies),
            images=sum(t.images for t in timings[mixed]),
            seconds=seconds[mixed],
            p50=percentile(latencies, 50),
            p95=percentile(latencies, 95),
        )

    return of(True), of(False)


# --- server log and lora_rows.py ------------------------------------------------------


def log_times(logs: str) -> tuple[dict[str, float], list[float]]:
    """From the server's JSON log: when each request was submitted (by request id) and
    when the engine core read each LoRA file, in seconds since the epoch."""
    submitted: dict[str, float] = {}
    reads: list[float] = []
    for line in logs.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        message = record.get("message")
        if message not in ("request submitted", "LoRA read"):
            continue
        when = datetime.strptime(record["time"], "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()
        if message == "LoRA read":
            reads.append(when)
        else:
            submitted[record["request_id"]] = when
    return submitted, sorted(reads)


def server_read_seconds(rounds: list[dict[str, Timing]], logs: str) -> list[float]:
    """Per first use: submitted -> the first "LoRA read" after it (the requests of (a) run
    one at a time, so that read is the first-use LoRA's)."""
    submitted, reads = log_times(logs)
    seconds = []
    for timings in rounds:
        request_id = timings["first_use"].request_id
        if request_id not in submitted:
            raise BenchmarkError(f"the server log has no 'request submitted' for {request_id}")
        start = submitted[request_id]
        read = next((when for when in reads if when >= start), None)
        if read is None:
            raise BenchmarkError(
                f"the server log has no 'LoRA read' after request {request_id}: its LoRA "
                "was already resident, or the log format changed"
            )
        seconds.append(read - start)
    return seconds


UNET_LINES = {
    "plain": r"plain UNet step:\s+([\d.]+) ms",
    "installed": r"layers installed, no LoRA:\s+([\d.]+) ms",
    "mixed": r"4 LoRAs over 8 requests \(mixed\):\s+([\d.]+) ms",
}


def unet_step_cost(args: argparse.Namespace, model: Path) -> dict[str, float]:
    """benchmarks/lora_rows.py on the same model, rank and device: seconds of one UNet call
    for 8 requests (16 rows) plain, with the layers installed, and with 4 LoRAs."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    command = [sys.executable, str(BENCHMARKS / "lora_rows.py"), "--model", str(model)]
    command += ["--device", device, "--rank", str(args.rank)]
    command += ["--repeats", str(args.unet_repeats), "--threads", str(args.intra_op_threads)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise BenchmarkError(f"benchmarks/lora_rows.py failed:\n{done.stderr[-4000:]}")
    found = {}
    for name, pattern in UNET_LINES.items():
        match = re.search(pattern, done.stdout)
        if match is None:
            raise BenchmarkError(
                f"benchmarks/lora_rows.py printed no line matching {pattern!r}:\n{done.stdout}"
            )
        found[name] = float(match.group(1)) / 1000
    return found


# --- the run --------------------------------------------------------------------------


@dataclass
class Results:
    """Everything measured in one run, and what was served."""

    setup: Setup
    first_use: FirstUse
    first_use_busy: FirstUse
    step_cost: StepCost
    mixed: Throughput
    plain: Throughput
    loads: tuple[float, float]

    @property
    def throughput_ratio(self) -> float:
        """Mixed over plain images per second."""
        return self.mixed.images_per_second / self.plain.images_per_second

    def goals(self) -> list[Goal]:
        """The issue's goals against what was measured."""
        return [
            Goal(
                "new LoRA running: request to first step, idle server (median)",
                self.first_use.first_use_to_first_step.median,
                GOAL_FIRST_USE_SECONDS,
                at_most=True,
                unit="s",
                worst=self.first_use.first_use_to_first_step.max,
            ),
            Goal(
                "new LoRA running: request to first step, beside a running request (median)",
                self.first_use_busy.first_use_to_first_step.median,
                GOAL_FIRST_USE_SECONDS,
                at_most=True,
                unit="s",
                worst=self.first_use_busy.first_use_to_first_step.max,
            ),
            Goal(
                "mixed batch step / plain, through the server",
                self.step_cost.server_ratio,
                GOAL_STEP_RATIO,
                at_most=True,
                unit="x",
            ),
            Goal(
                "mixed batch step / plain, one UNet call (lora_rows.py)",
                self.step_cost.unet_ratio,
                GOAL_STEP_RATIO,
                at_most=True,
                unit="x",
            ),
            Goal(
                "mixed concurrency images/s / plain",
                self.throughput_ratio,
                GOAL_THROUGHPUT_RATIO,
                at_most=False,
                unit="x",
            ),
        ]


def summarize_first_use(rounds: list[dict[str, Timing]], logs: str, busy: bool) -> FirstUse:
    """(a)'s summaries from its rounds and the server's log."""

    def of(kind: str, value: str) -> Summary:
        return Summary.of([getattr(r[kind], value) for r in rounds])

    resident = statistics.median(r["resident"].to_first_step for r in rounds)
    return FirstUse(
        busy=busy,
        resident_lora=rounds[0]["resident"].loras[0][0],
        none_to_started=of("none", "to_started"),
        none_to_first_step=of("none", "to_first_step"),
        resident_to_started=of("resident", "to_started"),
        resident_to_first_step=of("resident", "to_first_step"),
        first_use_to_started=of("first_use", "to_started"),
        first_use_to_first_step=of("first_use", "to_first_step"),
        extra_over_resident=Summary.of([r["first_use"].to_first_step - resident for r in rounds]),
        server_read=Summary.of(server_read_seconds(rounds, logs)),
        first_use_queue=of("first_use", "queue_seconds"),
        resident_queue=of("resident", "queue_seconds"),
    )


async def measure(
    server: LocalServer, setup: Setup, args: argparse.Namespace
) -> tuple[
    list[dict[str, Timing]],
    list[dict[str, Timing]],
    tuple[list[float], list[float]],
    Throughput,
    Throughput,
]:
    """Warm up, then (a) idle and busy, (b) and (c) against the running server."""
    async with AsyncKilnClient(server.address) as client:
        # Warm-up: the plain path and the resident LoRA (read and installed now).
        await timed(client, make_request(setup, args, 0, ()), args.request_timeout)
        warm = make_request(setup, args, 0, ((setup.resident, 1.0),))
        await timed(client, warm, args.request_timeout)
        say(f"(a) first use of {len(setup.first_use)} LoRAs on an idle server")
        rounds = await first_use(client, setup, args, busy=False)
        say(f"(a) first use of {len(setup.first_use_busy)} LoRAs beside a running request")
        busy_rounds = await first_use(client, setup, args, busy=True)
        say(f"(b) step cost: {args.batch_rounds} rounds of {REQUESTS}-request batches")
        gaps = await step_cost_rounds(client, setup, args)
        say(
            f"(c) throughput: {args.throughput_rounds} rounds of {args.clients} clients x "
            f"{args.requests_per_client} requests"
        )
        mixed, plain = await throughput(client, setup, args)
    return rounds, busy_rounds, gaps, mixed, plain


def say(text: str) -> None:
    """A progress line on stderr (the report goes to stdout)."""
    print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> Results:
    """Prepare, serve, measure (a)-(c), and run lora_rows.py."""
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="kiln-lora-bench-") as tmp:
        setup = prepare(args, Path(tmp))
        say(f"serving {setup.spec.name} from {setup.spec.path}")
        server = start_server(args, setup, Path(tmp))
        try:
            rounds, busy_rounds, (mixed_gaps, plain_gaps), mixed, plain = asyncio.run(
                measure(server, setup, args)
            )
        finally:
            server.terminate(timeout=120)
        logs = server.logs()
    first = summarize_first_use(rounds, logs, busy=False)
    first_busy = summarize_first_use(busy_rounds, logs, busy=True)
    say("(b) one UNet call: benchmarks/lora_rows.py")
    unet = unet_step_cost(args, setup.spec.path)
    step_cost = StepCost(
        server_mixed=statistics.median(mixed_gaps),
        server_plain=statistics.median(plain_gaps),
        server_mixed_steps=len(mixed_gaps),
        server_plain_steps=len(plain_gaps),
        unet_plain=unet["plain"],
        unet_installed=unet["installed"],
        unet_mixed=unet["mixed"],
    )
    loads.append(os.getloadavg()[0])
    return Results(setup, first, first_busy, step_cost, mixed, plain, (loads[0], loads[1]))


# --- reporting ------------------------------------------------------------------------


def machine() -> str:
    """CPU model, cores, torch and Python versions, and the GPU if torch sees one."""
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{platform.machine()} ({cpu_name()}), {os.cpu_count()} cores, torch "
        f"{torch.__version__}, Python {platform.python_version()}{gpu}"
    )


def command(args: argparse.Namespace) -> str:
    """The command line that ran this benchmark."""
    return shlex.join([".venv/bin/python", "benchmarks/lora.py", *args.argv])


def workload(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """The settings the numbers depend on."""
    return {
        "model": setup.spec.name,
        "model_path": str(setup.spec.path),
        "backend": args.backend or "auto",
        "device": args.device or "auto",
        "dtype": args.dtype or "auto",
        "steps": args.steps or setup.spec.default_num_inference_steps,
        "size": [setup.spec.default_width, setup.spec.default_height],
        "rank": args.rank,
        "format": args.format,
        "max_lora_rank": setup.max_lora_rank,
        "lora_slots": args.lora_slots,
        "max_batch_rows": args.max_batch_rows,
        "intra_op_threads": args.intra_op_threads,
        "config_server_settings": setup.server_settings,
        "resident_lora": setup.resident,
        "first_use_loras": len(setup.first_use),
        "batch_requests": REQUESTS,
        "mixed_loras": MIXED_LORAS,
        "batch_rounds": args.batch_rounds,
        "clients": args.clients,
        "requests_per_client": args.requests_per_client,
        "throughput_rounds": args.throughput_rounds,
        "unet_repeats": args.unet_repeats,
    }


def document(results: Results, args: argparse.Namespace) -> dict[str, Any]:
    """The `--json` document: the workload, every measured number (seconds) and the goals."""
    cost = results.step_cost

    def run_of(run: Throughput) -> dict[str, Any]:
        return {**asdict(run), "images_per_second": run.images_per_second}

    return {
        "benchmark": "benchmarks/lora.py",
        "measured": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "command": command(args),
        "load_average": list(results.loads),
        "workload": workload(results.setup, args),
        "first_use": {
            "idle": asdict(results.first_use),
            "busy": asdict(results.first_use_busy),
        },
        "step_cost": {
            "server": {
                "mixed_step_seconds": cost.server_mixed,
                "plain_step_seconds": cost.server_plain,
                "mixed_steps_measured": cost.server_mixed_steps,
                "plain_steps_measured": cost.server_plain_steps,
                "ratio": cost.server_ratio,
            },
            "unet": {
                "plain_seconds": cost.unet_plain,
                "installed_seconds": cost.unet_installed,
                "mixed_seconds": cost.unet_mixed,
                "ratio": cost.unet_ratio,
            },
        },
        "throughput": {
            "mixed": run_of(results.mixed),
            "plain": run_of(results.plain),
            "ratio": results.throughput_ratio,
        },
        "goals": [{**asdict(goal), "passed": goal.passed} for goal in results.goals()],
    }


def ms(seconds: float) -> str:
    """Seconds as milliseconds, for the tables."""
    return f"{seconds * 1000:.1f}"


def first_use_rows(first: FirstUse) -> list[str]:
    """(a)'s table rows of one server state: ms to `started` and to step 1 per kind."""
    server = "beside a running request" if first.busy else "idle"
    kinds = (
        ("no LoRA", first.none_to_started, first.none_to_first_step),
        ("resident LoRA", first.resident_to_started, first.resident_to_first_step),
        ("first use", first.first_use_to_started, first.first_use_to_first_step),
    )
    return [
        f"| {server} | {kind} | {ms(started.median)} | {ms(started.max)} "
        f"| {ms(step.median)} | {ms(step.max)} |"
        for kind, started, step in kinds
    ]


def first_use_server_side(first: FirstUse) -> str:
    """(a)'s extra over a resident LoRA and the server's part, for one server state."""
    server = "Beside a running request" if first.busy else "Idle server"
    return (
        f"{server}: a first use to step 1 takes median {ms(first.extra_over_resident.median)} "
        f"ms (max {ms(first.extra_over_resident.max)}) more than the resident LoRA's median. "
        f"Server side: request submitted to the file read (engine core log) median "
        f"{ms(first.server_read.median)} ms (max {ms(first.server_read.max)}); queue time "
        f"(arrival to admission) median {ms(first.first_use_queue.median)} ms for a first "
        f"use against {ms(first.resident_queue.median)} ms for the resident LoRA."
    )


def report(results: Results, args: argparse.Namespace) -> str:
    """The Markdown section: machine, command, the goals, then (a), (b) and (c) in detail."""
    setup = results.setup
    work = workload(setup, args)
    cost = results.step_cost
    goal_rows = []
    for goal in results.goals():
        relation = "≤" if goal.at_most else "≥"
        if goal.unit == "s":
            measured, target = f"{ms(goal.measured)} ms", f"{relation} {ms(goal.target)} ms"
        else:
            measured, target = f"{goal.measured:.2f}x", f"{relation} {goal.target:g}x"
        if goal.worst is not None:
            measured += f" (max {ms(goal.worst)})"
        goal_rows.append(
            f"| {goal.name} | {measured} | {target} | {'pass' if goal.passed else 'FAIL'} |"
        )

    lines = [
        SECTION,
        "",
        f"Machine: {machine()}; measured {time.strftime('%Y-%m-%d')}; 1-minute load average "
        f"{results.loads[0]:.1f} before, {results.loads[1]:.1f} after.",
        f"Command: `{command(args)}`",
        f"Workload: model `{work['model']}` ({work['size'][0]}x{work['size'][1]}, "
        f"{work['steps']} steps, one image per request), backend {work['backend']}, device "
        f"{work['device']}, {args.intra_op_threads} engine thread(s); generated LoRAs of rank "
        f"{args.rank} ({args.format} files) on every attention projection, stack padded to "
        f"rank {setup.max_lora_rank}, {args.lora_slots} LoRA slots, max_batch_rows "
        f"{args.max_batch_rows}"
        + "".join(
            f"; {key} = {value!r} from --config" for key, value in setup.server_settings.items()
        )
        + ".",
        "",
        "| goal (issue #12) | measured | target | result |",
        "|---|---:|---:|---|",
        *goal_rows,
        "",
        f"**(a) First use**, {len(setup.first_use)} LoRAs never asked for before on an "
        f"idle server and {len(setup.first_use_busy)} more each sent while a request with no "
        "LoRA was running (after its first step), each beside a request with no LoRA and "
        f"one with the resident `{results.first_use.resident_lora}` sent the same way; "
        "client-side ms from sending:",
        "",
        "| server | request | to `started` median | max | to step 1 median | max |",
        "|---|---|---:|---:|---:|---:|",
        *first_use_rows(results.first_use),
        *first_use_rows(results.first_use_busy),
        "",
        first_use_server_side(results.first_use),
        "",
        first_use_server_side(results.first_use_busy),
        "",
        f"**(b) Step cost**, {REQUESTS} requests in one batch (2 rows each under guidance), "
        f"two each with {MIXED_LORAS} resident LoRAs at scale 1, against the same with none:",
        "",
        "| measured how | plain ms | mixed ms | mixed / plain |",
        "|---|---:|---:|---:|",
        f"| through the server: gaps between progress events while all {REQUESTS} ran, "
        f"median of {cost.server_plain_steps} / {cost.server_mixed_steps} steps over "
        f"{args.batch_rounds} rounds | {ms(cost.server_plain)} | {ms(cost.server_mixed)} "
        f"| {cost.server_ratio:.2f}x |",
        f"| one UNet call, no server (lora_rows.py, stack padded to rank {args.rank}, median "
        f"of {args.unet_repeats}; layers installed without a LoRA: {ms(cost.unet_installed)} "
        f"ms) | {ms(cost.unet_plain)} | {ms(cost.unet_mixed)} | {cost.unet_ratio:.2f}x |",
        "",
        f"**(c) Throughput**, {args.clients} concurrent clients, {args.requests_per_client} "
        f"requests each in turn, {args.throughput_rounds} runs of each workload alternating "
        f"which goes first; mixed: each request one of the {MIXED_LORAS} LoRAs (scales "
        f"{', '.join(f'{s:g}' for s in MIXED_SCALES)}) or none, in turn:",
        "",
        "| workload | requests | images/s | vs plain | p50 s | p95 s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, run in (("plain (no LoRA)", results.plain), ("mixed LoRAs", results.mixed)):
        ratio = run.images_per_second / results.plain.images_per_second
        lines.append(
            f"| {label} | {run.requests} | {run.images_per_second:.2f} | {ratio:.2f}x "
            f"| {run.p50:.3f} | {run.p95:.3f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line, checked; every bad value is a usage error naming its flag."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--model",
        default=None,
        help="built-in model name or a diffusers SDXL folder; with --config, the name of "
        f"its [[models]] entry (default: {default_builtin_name()}, or the config's default)",
    )
    parser.add_argument("--config", type=Path, help="serve this Kiln config's model entry")
    parser.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"))
    parser.add_argument("--engines", type=Path, help="engines folder for the backend")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: the server's)")
    parser.add_argument("--dtype", choices=("fp16", "bf16", "fp32"))
    parser.add_argument("--cache-dir", type=Path, help="built-in model cache")
    parser.add_argument("--steps", type=int, default=0, help="0 = the model's default")
    parser.add_argument("--rank", type=int, default=16, help="rank of the generated LoRAs")
    parser.add_argument("--format", choices=("kohya", "peft"), default="kohya")
    parser.add_argument("--first-use", type=int, default=8, help="LoRAs timed at first use")
    parser.add_argument("--batch-rounds", type=int, default=3, help="(b) rounds of each batch")
    parser.add_argument("--clients", type=int, default=8, help="(c) concurrent clients")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument(
        "--throughput-rounds", type=int, default=2, help="(c) runs of each workload"
    )
    parser.add_argument(
        "--unet-repeats", type=int, default=20, help="lora_rows.py timed calls (its --repeats)"
    )
    parser.add_argument("--lora-slots", type=int, default=8, help="the server's --lora-slots")
    parser.add_argument(
        "--max-lora-rank",
        type=int,
        default=0,
        help="the server's --max-lora-rank, the rank every slot is padded to (default 0: "
        "the highest rank served, as lora_rows.py pads; 128 is the server's default)",
    )
    parser.add_argument("--max-batch-rows", type=int, default=2 * REQUESTS)
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=1,
        help="server engine threads and lora_rows.py's (default 1: the clients and the API "
        "process need the other core of a 2-core machine)",
    )
    parser.add_argument("--start-timeout", type=float, default=600, help="server start, s")
    parser.add_argument("--request-timeout", type=float, default=600, help="per request, s")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results")
    parser.add_argument(
        "--results",
        "--write-results",
        action="store_true",
        help="replace this benchmark's section of benchmarks/RESULTS.md",
    )
    parser.add_argument("--results-file", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(argv)
    if args.config is None and args.model is None:
        args.model = default_builtin_name()
    minimums = {
        "rank": 1,
        "first_use": 1,
        "batch_rounds": 1,
        "clients": 1,
        "requests_per_client": 1,
        "throughput_rounds": 1,
        "unet_repeats": 1,
        "max_batch_rows": 1,
        "intra_op_threads": 1,
        "steps": 0,
        "max_lora_rank": 0,
        # The 4 mixed LoRAs stay resident beside the one being read.
        "lora_slots": MIXED_LORAS + 1,
    }
    for name, least in minimums.items():
        if getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}")
    if args.backend is not None and (refusal := refusal_for_backend(args.backend)):
        parser.error(f"--backend {args.backend}: {refusal.removeprefix('loras: ')}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run the benchmark, print (and optionally record) the report."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        results = run(args)
    except BenchmarkError as error:
        print(f"benchmarks/lora.py: {error}", file=sys.stderr)
        return 2
    if args.json:
        write_atomic(args.json, json.dumps(document(results, args), indent=2) + "\n")
    section = report(results, args)
    print(section)
    if args.results:
        write_section(SECTION, section, args.results_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
