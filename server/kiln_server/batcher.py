"""Continuous batching at the granularity of one denoising step.

The batcher owns the bounded wait queue and the running batch, and decides what runs each
step; the pipeline only executes. Jobs whose latents have the same shape on the same model
share one UNet call per step even when they arrived at different times, sit at different
steps, or use different schedulers, guidance scales, step counts and prompts. A job joins
at the next step boundary and leaves when it finishes or is cancelled.

Fairness: waiting jobs are ordered by priority plus age (every `aging_seconds` of waiting
is worth one priority level) and then by arrival. Admission walks that order: a job joins
its shape's group in the running batch when the group has room for its rows, and may
start a new group while fewer than `max_shape_groups` run. Within a shape nothing
overtakes a job that did not fit; a job refused only because every group slot is taken
stops admission altogether, so the groups drain and its shape gets a slot.

Time-sharing: each step runs one shape group, chosen by start-time fair queueing: every
group keeps a virtual time that grows by the engine seconds of its steps divided by its
weight (the highest priority among its jobs), and the group furthest behind runs next. A
short request of another shape thus gets its share of the engine at once instead of
waiting for a long batch to drain; the price is that the long batch's steps are spread
out (benchmarks/timesharing.py measures both).

LoRAs: the batch key does not include them; rows of one UNet call each apply their own
request's LoRAs. A job's LoRAs are made resident before it is admitted: between steps the
engine thread installs adapters the model's loader thread has read and queues reads for
what the waiting jobs need (kiln_server.lora.library), so the first use of a LoRA reads
its file off the engine thread while the batch goes on; the job waits in the queue
meanwhile (with `queued` events, never an error), and later jobs of its shape may overtake
it. A LoRA that cannot be used fails the waiting jobs that asked for it with
INVALID_ARGUMENT naming `loras`, the file and why; a request with LoRAs for a model whose
backend applies none fails with FAILED_PRECONDITION at submit.

Models: with a model library (kiln_server.library.residency) the resident models come and
go. Between steps the engine thread hands the library the models of the running and
waiting jobs; the library installs a model its loader thread has finished, unloads idle
ones for room, and starts the next load. A job whose model is loading waits in the queue
without blocking others; a job whose model waits for busy models to free memory stops
admission behind it (as a shape without a group slot does), so they drain. A job whose
model could not load fails with UNAVAILABLE naming the cause.

Failure: the engine thread is watched. An exception that escapes a step (an engine or
device error) or a step that makes no progress for `stall_seconds` ends every job with
INTERNAL naming the cause, refuses new jobs, and calls `on_fatal` so the process can exit
for its supervisor; a broken device is not something to serve through.

The engine thread only runs engines: it computes preview pixels and decodes finished
images on the engines' device, then hands those tensors to the output thread, which waits
for the device, moves them to the host, encodes previews and emits the events. A job's
events are emitted in the order they happened (queued, started, progress..., images,
completed): once a job has something with the output thread, its later events follow the
same way; otherwise they are emitted at once, on the thread where they happen.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from kiln_server.engines.base import EngineError
from kiln_server.engines.device import bind_thread
from kiln_server.events import (
    Decoded,
    Failed,
    Finished,
    JobEvent,
    Progress,
    Queued,
    Started,
)
from kiln_server.library.residency import ModelLibrary
from kiln_server.lora.errors import LoraError
from kiln_server.lora.policy import refusal_for_engines
from kiln_server.pipeline.kinds import Pipeline, State
from kiln_server.pipeline.params import GenerationParams, LoraUse

logger = logging.getLogger(__name__)

ShapeKey = tuple[str, int, int]
ENGINE_THREAD = "kiln-engine"
OUTPUT_THREAD = "kiln-output"
WATCHDOG_THREAD = "kiln-watchdog"


class QueueFull(Exception):
    """The wait queue is at capacity; retry after `retry_after` seconds."""

    def __init__(self, capacity: int, retry_after: float) -> None:
        super().__init__(f"the queue is full ({capacity} requests waiting)")
        self.capacity = capacity
        self.retry_after = retry_after


class Draining(Exception):
    """The server is shutting down and accepts no new jobs."""


@dataclass
class Job:
    """One request inside the batcher. `emit` must be safe to call from any thread."""

    request_id: str
    params: GenerationParams
    emit: Callable[[JobEvent], None]
    arrival: float = field(default_factory=time.monotonic)
    sequence: int = 0
    state: State | None = None
    admitted_at: float | None = None
    engine_seconds: float = 0.0
    last_position: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    # The LoRAs its rows apply, as the model's LoRA library names them (set at submit).
    loras: tuple[LoraUse, ...] = ()
    # Rows per step as its model's pipeline counts them (FLUX's distilled guidance needs
    # no second row); None until the pipeline is known.
    row_count: int | None = None

    @property
    def lora_names(self) -> frozenset[str]:
        """The adapters that must be resident before the job runs."""
        return frozenset(use.name for use in self.loras)

    @property
    def shape_key(self) -> ShapeKey:
        """Jobs with equal keys can share a UNet call."""
        return (self.params.model, self.params.height, self.params.width)

    @property
    def rows(self) -> int:
        """Denoiser rows the job occupies per step: its pipeline's count once known (set
        at submit, or when its model is installed), else the SDXL rule."""
        if self.row_count is not None:
            return self.row_count
        factor = 2 if self.params.do_classifier_free_guidance else 1
        return self.params.num_outputs * factor

    def cancel(self) -> None:
        """Ask the batcher to drop this job at the next step boundary."""
        self.cancelled.set()


@dataclass(frozen=True)
class BatcherSettings:
    """Capacity and fairness knobs.

    `max_batch_rows` caps UNet rows per call for each model (a job's rows are doubled under
    guidance); a single job larger than the cap still runs, alone. `max_shape_groups` and
    `stall_seconds` are explained in the module docstring.
    """

    max_queue: int = 64
    max_batch_rows: Mapping[str, int] = field(default_factory=dict)
    default_max_batch_rows: int = 8
    aging_seconds: float = 5.0
    # Shape groups that may share the engine at once (their jobs' latents stay resident).
    max_shape_groups: int = 4
    # A step (or an admission) running longer than this means the engine is stuck.
    stall_seconds: float = 300.0


@dataclass
class BatcherStats:
    """Counters a benchmark or the logs can read."""

    steps: int = 0
    rows: int = 0
    jobs_completed: int = 0
    jobs_failed: int = 0
    jobs_cancelled: int = 0
    mean_job_seconds: float = 0.0

    @property
    def mean_batch_rows(self) -> float:
        """Average UNet rows per step so far."""
        return self.rows / self.steps if self.steps else 0.0


@dataclass
class BatcherLoad:
    """Jobs waiting and UNet rows in the running batch, per model, at one moment."""

    pending: dict[str, int] = field(default_factory=dict)
    running_rows: dict[str, int] = field(default_factory=dict)
    running_jobs: dict[str, int] = field(default_factory=dict)
    # LoRAs made resident since start, per model serving LoRAs (a running total).
    lora_loads: dict[str, int] = field(default_factory=dict)


HandOff = Callable[[], list[JobEvent]]
"""Work for the output thread: returns the job's events to emit, in order."""


def mark_ready(tensor: torch.Tensor) -> torch.cuda.Event | None:
    """On CUDA, an event recorded after the work that computes `tensor` on the current
    stream, for the output thread to wait on; None on the CPU, where it is ready now."""
    if tensor.device.type != "cuda":
        return None
    event = torch.cuda.Event(blocking=True)  # the output thread sleeps on it, never spins
    event.record(torch.cuda.current_stream(tensor.device))
    return event


class OutputThread:
    """Runs hand-offs from the engine thread, and keeps each job's events in order.

    `emit` and `hand_off` may be called from any thread. A job's events pass through the
    queue only while it has a hand-off pending, so a step without a preview costs the
    engine thread no thread switch.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self._queue: queue.SimpleQueue[tuple[Job, HandOff] | None] = queue.SimpleQueue()
        self._condition = threading.Condition()
        self._pending: dict[int, int] = {}  # id(job) -> its items in the queue
        self._copy_streams: dict[torch.device, torch.cuda.Stream] = {}
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread."""
        self._thread = threading.Thread(target=self._run, name=OUTPUT_THREAD, daemon=True)
        self._thread.start()

    def emit(self, job: Job, event: JobEvent) -> None:
        """Emit now, or after the job's pending hand-offs when it has any."""
        with self._condition:
            if id(job) in self._pending:
                self._enqueue(job, lambda: [event])
                return
        job.emit(event)

    def hand_off(self, job: Job, work: HandOff) -> None:
        """Run `work` on the output thread and emit the events it returns."""
        with self._condition:
            self._enqueue(job, work)

    def to_host(self, tensor: torch.Tensor, ready: torch.cuda.Event | None) -> np.ndarray:
        """`tensor` on the host, once `ready` (from mark_ready) says the device wrote it.

        Runs on the output thread. On CUDA the copy runs on a stream of its own, so it
        does not queue behind the engine's next step.
        """
        if ready is None:
            return tensor.cpu().numpy()
        ready.synchronize()
        stream = self._copy_streams.get(tensor.device)
        if stream is None:
            stream = self._copy_streams[tensor.device] = torch.cuda.Stream(tensor.device)
        with torch.cuda.stream(stream):
            host = tensor.to("cpu")  # synchronous: done before `tensor` can be freed
        return host.numpy()

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until nothing is pending (True) or `timeout` passes (False)."""
        with self._condition:
            return self._condition.wait_for(lambda: not self._pending, timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued (hand-offs queued later never run), then end the thread."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def _enqueue(self, job: Job, work: HandOff) -> None:
        self._pending[id(job)] = self._pending.get(id(job), 0) + 1
        self._queue.put((job, work))

    def _run(self) -> None:
        bind_thread(self.device)
        while (item := self._queue.get()) is not None:
            job, work = item
            try:
                events = work()
            except Exception as exc:  # the device or the host copy failed: this job only
                logger.exception(
                    "request failed in the output thread", extra={"request_id": job.request_id}
                )
                events = [Failed("INTERNAL", f"generation failed in the engine: {_name(exc)}")]
            for event in events:
                try:
                    job.emit(event)
                except Exception:  # a listener's fault must not stop the other jobs' events
                    logger.exception("an event callback failed")
            # Only now may the job's next event skip the queue: it cannot overtake these.
            with self._condition:
                left = self._pending[id(job)] - 1
                if left:
                    self._pending[id(job)] = left
                else:
                    del self._pending[id(job)]
                    self._condition.notify_all()


def _name(exc: BaseException) -> str:
    return type(exc).__name__


class Batcher:
    """Schedules jobs onto the pipelines from one engine thread; see the module docstring
    for what its output thread does."""

    def __init__(
        self,
        pipelines: Mapping[str, Pipeline],
        settings: BatcherSettings,
        clock: Callable[[], float] = time.monotonic,
        on_fatal: Callable[[str], None] | None = None,
        library: ModelLibrary | None = None,
    ) -> None:
        # The resident models' pipelines; with a library, models come and go (engine
        # thread, under the lock).
        self.pipelines = dict(pipelines)
        self.library = library
        self.settings = settings
        self.clock = clock
        self.on_fatal = on_fatal
        self.stats = BatcherStats()
        self._waiting: list[Job] = []
        self._running: list[Job] = []
        # Start-time fair queueing: each running shape group's virtual time.
        self._virtual_time: dict[ShapeKey, float] = {}
        self._virtual_now = 0.0
        # When the engine thread began its current step or admission; None while idle.
        self._busy_since: float | None = None
        self.failure: str | None = None
        self._watchdog: threading.Thread | None = None
        self._watchdog_stop = threading.Event()
        self._condition = threading.Condition()
        self._sequence = 0
        self._draining = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        # One engine core serves one device: the first GPU among the pipelines', if any.
        devices = [p.device for p in pipelines.values() if p.device.type == "cuda"]
        self.device = devices[0] if devices else torch.device("cpu")
        if library is not None:
            self.device = library.placement.device
            library.on_change = self._model_news_arrived
        self._output = OutputThread(self.device)
        # Set when a LoRA file was read (or failed) since the engine thread last looked.
        self._lora_news = False
        # Set when the model library has something for the engine thread (a finished
        # load, an admin request); `_room_for` holds the models waiting for room.
        self._model_news = False
        self._room_for: set[str] = set()
        for pipeline in pipelines.values():
            if pipeline.loras is not None:
                pipeline.loras.on_read = self._lora_read

    # ----- API side (any thread) -----

    def submit(self, job: Job) -> None:
        """Queue a job or raise QueueFull / Draining at once. A job whose LoRAs the model
        cannot apply is not queued: it gets its Failed event now."""
        pipeline = self.pipelines.get(job.params.model)
        if pipeline is not None:
            job.row_count = pipeline.rows_for(job.params)
        refusal = self._lora_refusal(job)
        if refusal is not None:
            self.stats.jobs_failed += 1
            self._output.emit(job, refusal)
            return
        with self._condition:
            if self.failure is not None:
                raise Draining(f"the engine has failed ({self.failure})")
            if self._draining or self._stopping:
                raise Draining("the server is shutting down")
            if len(self._waiting) >= self.settings.max_queue:
                raise QueueFull(self.settings.max_queue, self._retry_after())
            self._sequence += 1
            job.sequence = self._sequence
            job.arrival = self.clock()
            self._waiting.append(job)
            self._report_positions()
            self._condition.notify_all()

    def _lora_refusal(self, job: Job) -> Failed | None:
        """Set `job.loras` from its request, or say why the model cannot apply them."""
        if all(use.scale == 0.0 for use in job.params.loras):
            return None  # scale 0 is off: the base model, on any backend
        pipeline = self.pipelines.get(job.params.model)
        if pipeline is None:
            return None  # an unknown model fails at admission, as without LoRAs
        library = pipeline.loras
        if library is None:
            refusal = refusal_for_engines(pipeline.engines)
            if refusal is not None:
                return Failed("FAILED_PRECONDITION", refusal)
            return Failed(
                "INVALID_ARGUMENT", "loras: this model has no LoRA folders, so it serves no LoRAs"
            )
        try:
            job.loras = library.uses(job.params.loras)
        except LoraError as error:
            return Failed("INVALID_ARGUMENT", str(error))
        if len(job.lora_names) > library.capacity:
            return Failed(
                "INVALID_ARGUMENT",
                f"loras: the request applies {len(job.lora_names)} different LoRAs, but this "
                f"server keeps at most {library.capacity} resident (lora_slots)",
            )
        return None

    def _model_news_arrived(self) -> None:
        """The model library has news (any thread): wake the engine thread."""
        with self._condition:
            self._model_news = True
            self._condition.notify_all()

    def _lora_read(self) -> None:
        """A LoRA file was read or failed (loader thread): wake the engine thread."""
        with self._condition:
            self._lora_news = True
            self._condition.notify_all()

    def cancel(self, job: Job) -> None:
        """Drop a job: from the queue now, from the running batch at the next step."""
        job.cancel()
        with self._condition:
            if job in self._waiting:
                self._waiting.remove(job)
                self.stats.jobs_cancelled += 1
                self._report_positions()
            self._condition.notify_all()

    def load(self) -> BatcherLoad:
        """What waits and what runs now, per model (a short look under the lock)."""
        with self._condition:
            waiting = [job.params.model for job in self._waiting]
            running = [(job.params.model, job.rows) for job in self._running]
            pipelines = list(self.pipelines.items())
        load = BatcherLoad()
        for model in waiting:
            load.pending[model] = load.pending.get(model, 0) + 1
        for model, rows in running:
            load.running_rows[model] = load.running_rows.get(model, 0) + rows
            load.running_jobs[model] = load.running_jobs.get(model, 0) + 1
        for model, pipeline in pipelines:
            if pipeline.loras is not None:
                load.lora_loads[model] = pipeline.loras.stack.loads
        return load

    @property
    def in_flight(self) -> int:
        """Jobs waiting or running."""
        with self._condition:
            return len(self._waiting) + len(self._running)

    def start(self) -> None:
        """Start the engine thread and the output thread."""
        self._output.start()
        self._thread = threading.Thread(target=self._run, name=ENGINE_THREAD, daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(target=self._watch, name=WATCHDOG_THREAD, daemon=True)
        self._watchdog.start()

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new jobs and wait for every accepted one to end, its last event emitted.
        True if all ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            self._draining = True
            self._condition.notify_all()
            while self._waiting or self._running:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._condition.wait(timeout=remaining)
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        return self._output.wait_idle(remaining)

    def stop(self) -> None:
        """Stop the engine thread; jobs still queued fail with UNAVAILABLE. Events of jobs
        that finished before are all emitted when this returns."""
        with self._condition:
            self._stopping = True
            leftovers = self._waiting + self._running
            self._waiting, self._running = [], []
            self._condition.notify_all()
        for job in leftovers:
            self._output.emit(
                job, Failed("UNAVAILABLE", "the server stopped before this request finished")
            )
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.library is not None:
            self.library.close()
        for pipeline in self.pipelines.values():
            if pipeline.loras is not None:
                pipeline.loras.close()
        self._watchdog_stop.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=5)
        self._output.stop()

    # ----- engine thread -----

    def _run(self) -> None:
        bind_thread(self.device)
        try:
            while True:
                with self._condition:
                    # The newest job the refreshes below see; a later one gets its own look.
                    seen = self._sequence
                self._refresh_models()
                self._refresh_loras()
                with self._condition:
                    while not (
                        self._waiting or self._running or self._stopping or self._model_news
                    ):
                        self._condition.wait()
                    if self._stopping or self.failure is not None:
                        return
                    self._drop_cancelled()
                    admitted = self._select_admissions()
                    if not (admitted or self._running):
                        # Every waiting job waits for a model or a LoRA file: sleep until
                        # one is ready (the timeout only guards against a missed wake-up),
                        # unless a job came after the refreshes looked: its loads start now.
                        if not (self._lora_news or self._model_news or self._sequence != seen):
                            self._condition.wait(timeout=1.0)
                        continue
                    self._busy_since = self.clock()
                for job in admitted:
                    self._admit(job)
                self._step()
                with self._condition:
                    self._busy_since = None
        except BaseException as exc:  # whatever it is, the engine is done
            logger.exception("the engine thread failed")
            self._fail_all(f"the engine failed: {_name(exc)}: {exc}"[:300])

    def _refresh_models(self) -> None:
        """Between steps (engine thread): let the model library install finished loads,
        unload, and start the load the waiting jobs need; fail the jobs of a model that
        could not load, and settle the LoRAs of the waiting jobs of a model just
        installed (they were queued before its LoRA library existed)."""
        library = self.library
        if library is None:
            return
        with self._condition:
            self._model_news = False
            running = {job.params.model for job in self._running}
            wanted = [job.params.model for job in self._priority_order()]
        if all(model in self.pipelines for model in wanted) and not library.has_news:
            return
        changes = library.refresh(running, wanted)
        failures: list[tuple[Job, Failed]] = []
        with self._condition:
            for name in changes.removed:
                self.pipelines.pop(name, None)
            for name, pipeline in changes.installed.items():
                if pipeline.loras is not None:
                    pipeline.loras.on_read = self._lora_read
                self.pipelines[name] = pipeline
            self._room_for = changes.blocked
            for job in list(self._waiting):
                model = job.params.model
                refusal: Failed | None = None
                if model in changes.failed:
                    refusal = Failed("UNAVAILABLE", changes.failed[model])
                elif model in changes.installed:
                    job.row_count = changes.installed[model].rows_for(job.params)
                    refusal = self._lora_refusal(job)
                if refusal is not None:
                    self._waiting.remove(job)
                    failures.append((job, refusal))
            if failures:
                self._report_positions()
        if changes.removed:
            library.collect()
        for job, refusal in failures:
            logger.info(
                "request failed while waiting for its model",
                extra={"request_id": job.request_id, "why": refusal.message},
            )
            self.stats.jobs_failed += 1
            self._output.emit(job, refusal)

    def _refresh_loras(self) -> None:
        """Between steps (engine thread): install the LoRAs read since the last look, queue
        reads for the waiting jobs' LoRAs, and fail the waiting jobs whose LoRA failed."""
        libraries = {name: p.loras for name, p in self.pipelines.items() if p.loras is not None}
        if not libraries:
            return
        with self._condition:
            self._lora_news = False
            running = [job for job in self._running if job.loras]
            waiting = [job for job in self._priority_order() if job.loras]
        failed: dict[str, dict[str, LoraError]] = {}
        for model, library in libraries.items():
            in_use = set().union(*(j.lora_names for j in running if j.params.model == model))
            wanted = [j.lora_names for j in waiting if j.params.model == model]
            if in_use or wanted:
                failed[model] = library.refresh(in_use, wanted)
        failures: list[tuple[Job, LoraError]] = []
        with self._condition:
            for job in [j for j in self._waiting if j.loras]:
                errors = failed.get(job.params.model, {})
                error = next((errors[n] for n in sorted(job.lora_names) if n in errors), None)
                if error is not None:
                    self._waiting.remove(job)
                    failures.append((job, error))
            if failures:
                self._report_positions()
        for job, error in failures:
            logger.info(
                "request failed: a LoRA cannot be used",
                extra={"request_id": job.request_id, "why": str(error)},
            )
            self.stats.jobs_failed += 1
            self._output.emit(job, Failed("INVALID_ARGUMENT", str(error)))

    def _watch(self) -> None:
        """Watchdog: fail everything when a step makes no progress for `stall_seconds`."""
        stall = self.settings.stall_seconds
        period = min(1.0, stall / 4)
        while not self._watchdog_stop.wait(period):
            with self._condition:
                if self._stopping or self.failure is not None:
                    return
                busy = self._busy_since
            if busy is not None and self.clock() - busy > stall:
                logger.error("the engine thread made no progress for %g s", stall)
                self._fail_all(
                    f"the engine made no progress for {stall:g} s (a stuck device?); the "
                    "server restarts it"
                )
                return

    def _fail_all(self, reason: str) -> None:
        """The engine cannot go on: end every job with INTERNAL naming `reason`, refuse
        new ones, and tell the owner (once)."""
        with self._condition:
            if self.failure is not None or self._stopping:
                return
            self.failure = reason
            leftovers = self._waiting + self._running
            self._waiting, self._running = [], []
            self._condition.notify_all()
        for job in leftovers:
            self.stats.jobs_failed += 1
            self._output.emit(job, Failed("INTERNAL", reason))
        self._output.wait_idle(10.0)
        if self.on_fatal is not None:
            self.on_fatal(reason)

    def _priority_order(self) -> list[Job]:
        now = self.clock()
        aging = max(self.settings.aging_seconds, 1e-6)

        def rank(job: Job) -> tuple[float, int]:
            return (-(job.params.priority + (now - job.arrival) / aging), job.sequence)

        return sorted(self._waiting, key=rank)

    def _max_rows(self, model: str) -> int:
        return int(self.settings.max_batch_rows.get(model, self.settings.default_max_batch_rows))

    def _select_admissions(self) -> list[Job]:
        """Pick the waiting jobs that join the running batch at this step (lock held)."""
        rows: dict[ShapeKey, int] = {}
        for job in self._running:
            rows[job.shape_key] = rows.get(job.shape_key, 0) + job.rows
        blocked: set[ShapeKey] = set()
        chosen: list[Job] = []
        for job in self._priority_order():
            key = job.shape_key
            if key in blocked:
                continue
            if job.params.model not in self.pipelines:
                if job.params.model in self._room_for:
                    break  # its model waits for busy ones to drain: nothing overtakes it
                continue  # its model is loading; it waits without blocking others
            if job.loras and not self._loras_resident(job):
                continue  # its LoRA files are being read; it waits without blocking others
            if key not in rows and len(rows) >= self.settings.max_shape_groups:
                break  # every group slot is taken: let them drain rather than overtake
            taken = rows.get(key, 0)
            if taken and taken + job.rows > self._max_rows(key[0]):
                blocked.add(key)  # nothing of this shape overtakes it
                continue
            chosen.append(job)
            rows[key] = taken + job.rows
        for job in chosen:
            self._waiting.remove(job)
            self._running.append(job)
        if chosen:
            self._report_positions()
        return chosen

    def _loras_resident(self, job: Job) -> bool:
        library = self.pipelines[job.params.model].loras
        return library is not None and library.is_resident(job.lora_names)

    def _next_group(self, runnable: list[Job]) -> ShapeKey:
        """The shape group to step next: the lowest virtual time (lock held).

        A group that just became runnable starts at the virtual time of the step served
        last (start-time fair queueing's system time): level with the groups already
        running, so it neither waits behind their past service nor gets a burst of credit.
        """
        keys = {job.shape_key for job in runnable}
        for key in list(self._virtual_time):
            if key not in keys:
                del self._virtual_time[key]
        for key in keys:
            self._virtual_time.setdefault(key, self._virtual_now)
        first_arrival = {
            key: min(j.arrival for j in runnable if j.shape_key == key) for key in keys
        }
        chosen = min(keys, key=lambda k: (self._virtual_time[k], first_arrival[k]))
        self._virtual_now = self._virtual_time[chosen]
        return chosen

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._running if j.cancelled.is_set()]:
            self._running.remove(job)
            self.stats.jobs_cancelled += 1
            logger.info("request cancelled", extra={"request_id": job.request_id})
        for job in [j for j in self._waiting if j.cancelled.is_set()]:
            self._waiting.remove(job)
            self.stats.jobs_cancelled += 1
        self._condition.notify_all()

    def _admit(self, job: Job) -> None:
        job.admitted_at = self.clock()
        pipeline = self.pipelines[job.params.model]
        try:
            started = time.perf_counter()
            job.state = pipeline.prepare(job.params)
            job.engine_seconds += time.perf_counter() - started
        except (EngineError, ValueError) as exc:  # this request's inputs: this job only
            self._fail(job, exc)
            return
        self._output.emit(job, Started(total_steps=job.state.total_steps))

    def _step(self) -> None:
        with self._condition:
            runnable = [
                j for j in self._running if j.state is not None and not j.cancelled.is_set()
            ]
            if not runnable:
                return
            key = self._next_group(runnable)
        batch = [job for job in runnable if job.shape_key == key]
        pipeline = self.pipelines[key[0]]
        states = [job.state for job in batch if job.state is not None]
        # Each state returns to the pipeline that prepared it (mypy cannot pair unions).
        result = pipeline.denoise_step(states)  # type: ignore[arg-type]
        weight = max(job.params.priority for job in batch)
        with self._condition:
            if key in self._virtual_time:
                self._virtual_time[key] += result.engine_seconds / max(weight, 1)
        self.stats.steps += 1
        self.stats.rows += result.rows
        for job in batch:
            state = job.state
            assert state is not None
            job.engine_seconds += result.engine_seconds * job.rows / max(result.rows, 1)
            self._report_progress(pipeline, job, state)
            if state.finished:
                self._finish(pipeline, job, state)

    def _report_progress(self, pipeline: Pipeline, job: Job, state: State) -> None:
        step, total = state.step_index, state.total_steps
        options = job.params.preview
        due = options.every_n_steps and (step % options.every_n_steps == 0 or state.finished)
        if not due:
            self._output.emit(job, Progress(step, total))
            return
        size = pipeline.preview_size(state, options)  # type: ignore[arg-type]
        started = time.perf_counter()
        # An engine error here is the device's, not the preview's: it is fatal like a step's.
        pixels = pipeline.preview_pixels(state, options.method, size)  # type: ignore[arg-type]
        ready = mark_ready(pixels)
        # The preview decoder is an engine call: the job pays for it like a step.
        job.engine_seconds += time.perf_counter() - started

        def encode() -> list[JobEvent]:
            try:
                host = self._output.to_host(pixels, ready)
                preview = pipeline.previewer.encode(host, size, options.format, options.quality)
            except Exception:  # encoding a preview is a nicety; never fail the job over it
                logger.exception("preview failed", extra={"request_id": job.request_id})
                return [Progress(step, total)]
            return [Progress(step, total, preview)]

        self._output.hand_off(job, encode)

    def _finish(self, pipeline: Pipeline, job: Job, state: State) -> None:
        started = time.perf_counter()
        images = pipeline.decode(state)  # type: ignore[arg-type]
        ready = mark_ready(images)
        job.engine_seconds += time.perf_counter() - started
        now = self.clock()
        admitted = job.admitted_at if job.admitted_at is not None else now
        finished = Finished(
            queue_seconds=admitted - job.arrival,
            inference_seconds=now - admitted,
            engine_seconds=job.engine_seconds,
        )

        def deliver() -> list[JobEvent]:
            return [Decoded(self._output.to_host(images, ready)), finished]

        self._output.hand_off(job, deliver)
        self.stats.jobs_completed += 1
        total = now - job.arrival
        self.stats.mean_job_seconds += (total - self.stats.mean_job_seconds) * 0.2
        self._remove_running(job)

    def _fail(self, job: Job, exc: Exception) -> None:
        logger.exception(
            "request failed in the engine", extra={"request_id": job.request_id}, exc_info=exc
        )
        self.stats.jobs_failed += 1
        self._output.emit(job, Failed("INTERNAL", f"generation failed in the engine: {_name(exc)}"))
        self._remove_running(job)

    def _remove_running(self, job: Job) -> None:
        with self._condition:
            if job in self._running:
                self._running.remove(job)
            self._condition.notify_all()

    def _report_positions(self) -> None:
        """Send `queued` to every waiting job whose position changed (lock held)."""
        for position, job in enumerate(self._priority_order()):
            if job.last_position != position:
                job.last_position = position
                self._output.emit(job, Queued(position))

    def _retry_after(self) -> float:
        """A client's sensible wait before retrying: about one queue turnover."""
        per_job = self.stats.mean_job_seconds or 1.0
        concurrency = max(len(self._running), 1)
        return max(1.0, round(per_job * len(self._waiting) / concurrency, 1))
