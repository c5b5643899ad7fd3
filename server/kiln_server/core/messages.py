"""What the API process and the engine core process send each other over their socket pair."""

from __future__ import annotations

from dataclasses import dataclass

from kiln_server.core.shared_arrays import SharedArray
from kiln_server.engines.limits import EngineLimits
from kiln_server.events import JobEvent
from kiln_server.library.state import LibraryStatus
from kiln_server.models.registry import ModelRegistry
from kiln_server.pipeline.params import GenerationParams
from kiln_server.settings import ServerSettings

# API process -> engine core


@dataclass(frozen=True)
class StartCore:
    """The first message: what to load and how to batch."""

    settings: ServerSettings
    registry: ModelRegistry


@dataclass(frozen=True)
class SubmitJob:
    """Queue a request; its events come back as JobUpdate messages with `job_id`."""

    job_id: int
    request_id: str
    params: GenerationParams


@dataclass(frozen=True)
class CancelJob:
    """Drop a job from the queue now, or from the running batch at the next step."""

    job_id: int


@dataclass(frozen=True)
class LibraryCommand:
    """An admin request about the model library: `action` "status", "load" or "unload"
    (of `model`); answered by a LibraryReply with the same `request_id`."""

    request_id: int
    action: str
    model: str = ""


@dataclass(frozen=True)
class StopCore:
    """Fail whatever is still queued or running with UNAVAILABLE, then exit."""


Command = StartCore | SubmitJob | CancelJob | LibraryCommand | StopCore

# engine core -> API process


@dataclass(frozen=True)
class ServedModel:
    """A configured model and what its engines can run (learned when the core first
    loaded it; the same after each reload).

    `placement` is its device and precision ("cuda:0 fp16"), `reason` why its backend was
    chosen; validation and ListModels read `limits` (its sizes, rows, and whether the
    engines include a learned preview decoder, hence which preview methods are served).
    """

    name: str
    backend: str
    max_batch_rows: int
    limits: EngineLimits
    placement: str = ""
    reason: str = ""


@dataclass(frozen=True)
class CoreReady:
    """Every configured model was loaded and warmed up once (what its engines run is in
    `models`); those that fit the memory budget stay resident (`library`). Jobs may be
    submitted."""

    models: tuple[ServedModel, ...]
    library: LibraryStatus | None = None


@dataclass(frozen=True)
class CoreFailed:
    """Start-up failed; `message` names the problem and the fix. The core then exits."""

    message: str


@dataclass(frozen=True)
class JobUpdate:
    """One event of one job."""

    job_id: int
    event: JobEvent


@dataclass(frozen=True)
class JobImages:
    """A job's Decoded event, its pixels in a shared-memory block the API process now owns:
    it reads (or discards) and unlinks the block."""

    job_id: int
    pixels: SharedArray


@dataclass(frozen=True)
class CoreStats:
    """The core's load and memory, sent periodically when they changed.

    `pending` counts waiting jobs and `running_rows` the UNet rows of the running batch,
    per model; `memory` is resident bytes per device (the core's RSS for "cpu",
    torch.cuda.memory_allocated for a GPU); `lora_loads` the LoRAs made resident since the
    core started, per model that serves LoRAs.
    """

    pending: tuple[tuple[str, int], ...]
    running_rows: tuple[tuple[str, int], ...]
    memory: tuple[tuple[str, int], ...]
    lora_loads: tuple[tuple[str, int], ...] = ()
    # The model library: each model's state, bytes and loads (running totals).
    library: LibraryStatus | None = None


@dataclass(frozen=True)
class LibraryReply:
    """The answer to a LibraryCommand: the library's status once the action is settled,
    its active jobs per model (queued + running), the models unloaded for it, and, when it
    failed, `error_code` (a grpc.StatusCode name) and `error`."""

    request_id: int
    status: LibraryStatus
    active: tuple[tuple[str, int], ...] = ()
    unloaded: tuple[str, ...] = ()
    error_code: str = ""
    error: str = ""


Report = CoreReady | CoreFailed | JobUpdate | JobImages | CoreStats | LibraryReply
