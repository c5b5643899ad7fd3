"""Continuous batching at the granularity of one denoising step.

The batcher owns the bounded wait queue and the running batch, and decides what runs each
step; the pipeline only executes. Jobs whose latents have the same shape on the same model
share one UNet call per step even when they arrived at different times, sit at different
steps, or use different schedulers, guidance scales, step counts and prompts. A job joins
at the next step boundary and leaves when it finishes or is cancelled.

Fairness: waiting jobs are ordered by priority plus age (every `aging_seconds` of waiting
is worth one priority level) and then by arrival. Admission into the running batch walks
that order and stops at the first job of another shape, so a different-shape job at the
head of the line is never overtaken: the running batch drains and its shape goes next.

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
from kiln_server.pipeline.params import GenerationParams
from kiln_server.pipeline.sdxl import DenoiseState, SDXLPipeline

logger = logging.getLogger(__name__)

ShapeKey = tuple[str, int, int]
ENGINE_THREAD = "kiln-engine"
OUTPUT_THREAD = "kiln-output"


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
    state: DenoiseState | None = None
    admitted_at: float | None = None
    engine_seconds: float = 0.0
    last_position: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def shape_key(self) -> ShapeKey:
        """Jobs with equal keys can share a UNet call."""
        return (self.params.model, self.params.height, self.params.width)

    @property
    def rows(self) -> int:
        """UNet rows the job occupies per step."""
        factor = 2 if self.params.do_classifier_free_guidance else 1
        return self.params.num_outputs * factor

    def cancel(self) -> None:
        """Ask the batcher to drop this job at the next step boundary."""
        self.cancelled.set()


@dataclass(frozen=True)
class BatcherSettings:
    """Capacity and fairness knobs.

    `max_batch_rows` caps UNet rows per call for each model (a job's rows are doubled under
    guidance); a single job larger than the cap still runs, alone.
    """

    max_queue: int = 64
    max_batch_rows: Mapping[str, int] = field(default_factory=dict)
    default_max_batch_rows: int = 8
    aging_seconds: float = 5.0


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
        pipelines: Mapping[str, SDXLPipeline],
        settings: BatcherSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pipelines = pipelines
        self.settings = settings
        self.clock = clock
        self.stats = BatcherStats()
        self._waiting: list[Job] = []
        self._running: list[Job] = []
        self._condition = threading.Condition()
        self._sequence = 0
        self._draining = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        # One engine core serves one device: the first GPU among the pipelines', if any.
        devices = [p.device for p in pipelines.values() if p.device.type == "cuda"]
        self.device = devices[0] if devices else torch.device("cpu")
        self._output = OutputThread(self.device)

    # ----- API side (any thread) -----

    def submit(self, job: Job) -> None:
        """Queue a job or raise QueueFull / Draining at once."""
        with self._condition:
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

    def cancel(self, job: Job) -> None:
        """Drop a job: from the queue now, from the running batch at the next step."""
        job.cancel()
        with self._condition:
            if job in self._waiting:
                self._waiting.remove(job)
                self.stats.jobs_cancelled += 1
                self._report_positions()
            self._condition.notify_all()

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
        self._output.stop()

    # ----- engine thread -----

    def _run(self) -> None:
        bind_thread(self.device)
        while True:
            with self._condition:
                while not (self._waiting or self._running or self._stopping):
                    self._condition.wait()
                if self._stopping:
                    return
                self._drop_cancelled()
                admitted = self._select_admissions()
            for job in admitted:
                self._admit(job)
            self._step()

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
        order = self._priority_order()
        if not order:
            return []
        key = self._running[0].shape_key if self._running else order[0].shape_key
        rows = sum(job.rows for job in self._running)
        limit = self._max_rows(key[0])
        chosen: list[Job] = []
        for job in order:
            if job.shape_key != key:
                break  # never overtake a waiting job of another shape
            if rows and rows + job.rows > limit:
                break
            chosen.append(job)
            rows += job.rows
        for job in chosen:
            self._waiting.remove(job)
            self._running.append(job)
        if chosen:
            self._report_positions()
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
        except Exception as exc:  # an engine fault fails this job only
            self._fail(job, exc)
            return
        self._output.emit(job, Started(total_steps=job.state.total_steps))

    def _step(self) -> None:
        with self._condition:
            batch = [j for j in self._running if j.state is not None and not j.cancelled.is_set()]
        if not batch:
            return
        pipeline = self.pipelines[batch[0].params.model]
        states = [job.state for job in batch if job.state is not None]
        try:
            result = pipeline.denoise_step(states)
        except Exception as exc:
            for job in batch:
                self._fail(job, exc)
            return
        self.stats.steps += 1
        self.stats.rows += result.rows
        for job in batch:
            state = job.state
            assert state is not None
            job.engine_seconds += result.engine_seconds * job.rows / max(result.rows, 1)
            self._report_progress(pipeline, job, state)
            if state.finished:
                self._finish(pipeline, job, state)

    def _report_progress(self, pipeline: SDXLPipeline, job: Job, state: DenoiseState) -> None:
        step, total = state.step_index, state.total_steps
        options = job.params.preview
        due = options.every_n_steps and (step % options.every_n_steps == 0 or state.finished)
        if not due:
            self._output.emit(job, Progress(step, total))
            return
        size = pipeline.preview_size(state, options)
        try:
            started = time.perf_counter()
            pixels = pipeline.preview_pixels(state, options.method, size)
            ready = mark_ready(pixels)
            # The preview decoder is an engine call: the job pays for it like a step.
            job.engine_seconds += time.perf_counter() - started
        except Exception:  # a preview is a nicety; never fail the job over it
            logger.exception("preview failed", extra={"request_id": job.request_id})
            self._output.emit(job, Progress(step, total))
            return

        def encode() -> list[JobEvent]:
            try:
                host = self._output.to_host(pixels, ready)
                preview = pipeline.previewer.encode(host, size, options.format, options.quality)
            except Exception:
                logger.exception("preview failed", extra={"request_id": job.request_id})
                return [Progress(step, total)]
            return [Progress(step, total, preview)]

        self._output.hand_off(job, encode)

    def _finish(self, pipeline: SDXLPipeline, job: Job, state: DenoiseState) -> None:
        try:
            started = time.perf_counter()
            images = pipeline.decode(state)
            ready = mark_ready(images)
            job.engine_seconds += time.perf_counter() - started
        except Exception as exc:
            self._fail(job, exc)
            return
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
