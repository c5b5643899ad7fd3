"""Continuous batching in-process: correctness against solo runs, admission and fairness.

The batcher runs its real engine thread over the tiny model's torch pipeline. Scheduling
decisions are made deterministic without sleeping: jobs are queued before the engine
thread starts, the clock is injected, and where a decision must happen mid-flight the test
acts from inside a job's event callback (which runs on the engine thread between steps).

Batched and solo runs agree to within one uint8 level: on torch CPU a different batch size
may change the matmul kernels' summation order, which measurably moves at most one level on
well under 0.01% of pixels (often none).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from kiln_server.batcher import Batcher, BatcherSettings, Draining, Job, QueueFull
from kiln_server.events import Decoded, Failed, Finished, JobEvent, Progress, Queued, Started
from kiln_server.pipeline.params import GenerationParams

MODEL = "tiny"
WAIT = 120.0  # generous bound on a job that should finish; never reached when all is well


class FakeClock:
    """A clock the test moves by hand (for queue ages and priorities)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Timeline:
    """Every event of every job, in the order the batcher emitted them."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, JobEvent]] = []
        self.lock = threading.Lock()

    def add(self, request_id: str, event: JobEvent) -> None:
        with self.lock:
            self.entries.append((request_id, event))

    def order_of(self, kind: type) -> list[str]:
        """Request ids in the order they emitted an event of `kind`."""
        with self.lock:
            return [rid for rid, event in self.entries if isinstance(event, kind)]


class Recorder:
    """A job's emit callback: keeps its events, runs test hooks, signals the end."""

    def __init__(self, request_id: str, timeline: Timeline) -> None:
        self.request_id = request_id
        self.timeline = timeline
        self.events: list[JobEvent] = []
        self.hooks: list[Callable[[JobEvent], None]] = []
        self.done = threading.Event()

    def __call__(self, event: JobEvent) -> None:
        self.events.append(event)
        self.timeline.add(self.request_id, event)
        for hook in self.hooks:
            hook(event)
        if isinstance(event, Finished | Failed):
            self.done.set()

    def wait(self) -> None:
        assert self.done.wait(WAIT), f"{self.request_id} never finished: {self.events}"

    def of(self, kind: type) -> list[Any]:
        return [event for event in self.events if isinstance(event, kind)]

    @property
    def pixels(self) -> np.ndarray:
        decoded = self.of(Decoded)
        assert len(decoded) == 1, f"{self.request_id}: {self.events}"
        return np.asarray(decoded[0].pixels)


def params(**overrides: Any) -> GenerationParams:
    """A short request on the tiny model; overrides change any field."""
    base = GenerationParams(
        prompt="a teapot", num_inference_steps=4, seed=1, model=MODEL, width=64, height=64
    )
    return replace(base, **overrides)


class Harness:
    """A batcher over the tiny pipeline plus helpers to submit recorded jobs."""

    def __init__(self, pipeline: Any, settings: BatcherSettings, clock: Any = None) -> None:
        kwargs = {"clock": clock} if clock is not None else {}
        self.batcher = Batcher({MODEL: pipeline}, settings, **kwargs)
        self.timeline = Timeline()
        self.recorders: dict[str, Recorder] = {}
        self.jobs: dict[str, Job] = {}

    def job(self, request_id: str, job_params: GenerationParams) -> Job:
        recorder = Recorder(request_id, self.timeline)
        self.recorders[request_id] = recorder
        job = Job(request_id=request_id, params=job_params, emit=recorder)
        self.jobs[request_id] = job
        return job

    def submit(self, request_id: str, job_params: GenerationParams) -> Recorder:
        self.batcher.submit(self.job(request_id, job_params))
        return self.recorders[request_id]

    def wait_all(self) -> None:
        """Wait for every job, including jobs submitted while waiting."""
        waited = 0
        while waited < len(self.recorders):
            for recorder in list(self.recorders.values())[waited:]:
                recorder.wait()
                waited += 1


@pytest.fixture
def harness(tiny_pipeline: Any) -> Iterator[Callable[..., Harness]]:
    """Make batcher harnesses; every engine thread is stopped afterwards."""
    made: list[Harness] = []

    def make(clock: Any = None, **settings: Any) -> Harness:
        made.append(Harness(tiny_pipeline, BatcherSettings(**settings), clock))
        return made[-1]

    yield make
    for item in made:
        item.batcher.stop()


def solo(pipeline: Any, job_params: GenerationParams) -> np.ndarray:
    """The request run alone, start to finish, outside the batcher."""
    return np.stack(pipeline.generate(job_params))


def assert_close_to_solo(batched: np.ndarray, alone: np.ndarray) -> None:
    assert batched.shape == alone.shape
    assert np.abs(batched.astype(np.int16) - alone.astype(np.int16)).max() <= 1


def test_batched_jobs_equal_their_solo_runs(tiny_pipeline: Any, harness: Any) -> None:
    requests = {
        "a": params(prompt="a teapot", seed=11),
        "b": params(prompt="a red bicycle", seed=22, num_outputs=2),
        "c": params(prompt="a lighthouse at dusk", seed=33, negative_prompt="fog"),
    }
    expected = {rid: solo(tiny_pipeline, p) for rid, p in requests.items()}
    h = harness(default_max_batch_rows=8)
    for rid, p in requests.items():
        h.submit(rid, p)
    h.batcher.start()
    h.wait_all()
    # They really shared the UNet: one call per step for all 8 rows (2 + 4 + 2).
    assert h.batcher.stats.steps == 4
    assert h.batcher.stats.mean_batch_rows == 8
    for rid, recorder in h.recorders.items():
        assert_close_to_solo(recorder.pixels, expected[rid])
        progress = recorder.of(Progress)
        assert [event.step for event in progress] == [1, 2, 3, 4]


def test_mixed_schedulers_steps_and_guidance_share_a_batch(
    tiny_pipeline: Any, harness: Any
) -> None:
    requests = {
        "euler-a": params(scheduler="K_EULER_ANCESTRAL", num_inference_steps=6, seed=5),
        "dpm": params(scheduler="DPMSolverMultistep", num_inference_steps=3, guidance_scale=9.0),
        "heun": params(scheduler="HeunDiscrete", num_inference_steps=3, guidance_scale=3.0),
        "ddim-unguided": params(scheduler="DDIM", num_inference_steps=5, guidance_scale=1.0),
        "pndm-unguided": params(scheduler="PNDM", num_inference_steps=4, guidance_scale=0.0),
    }
    expected = {rid: solo(tiny_pipeline, p) for rid, p in requests.items()}
    h = harness(default_max_batch_rows=8)
    for rid, p in requests.items():
        h.submit(rid, p)
    h.batcher.start()
    h.wait_all()
    # All five ran side by side: the batch stepped as long as the longest job (6), not
    # the sum of all jobs' evaluations (6 + 3 + 5 Heun + 5 + 4).
    assert h.batcher.stats.steps == 6
    for rid, recorder in h.recorders.items():
        assert_close_to_solo(recorder.pixels, expected[rid])
        totals = {event.total_steps for event in recorder.of(Progress)}
        assert len(totals) == 1


def test_a_job_joins_the_running_batch_mid_flight(tiny_pipeline: Any, harness: Any) -> None:
    first = params(prompt="a teapot", num_inference_steps=8, seed=3)
    late = params(prompt="a cactus", scheduler="DDIM", num_inference_steps=4, seed=4)
    expected = {"first": solo(tiny_pipeline, first), "late": solo(tiny_pipeline, late)}
    h = harness(default_max_batch_rows=8)
    recorder = h.submit("first", first)

    def submit_late(event: JobEvent) -> None:
        if isinstance(event, Progress) and event.step == 3:
            h.submit("late", late)

    recorder.hooks.append(submit_late)
    h.batcher.start()
    h.wait_all()
    started = h.timeline.order_of(Started)
    finished = h.timeline.order_of(Finished)
    assert started == ["first", "late"]
    # late joined at the 4th batched step and rode along for steps 4-7: it finished
    # before first (8 steps) without adding a single UNet call of its own.
    assert finished == ["late", "first"]
    assert h.batcher.stats.steps == 8
    for rid in ("first", "late"):
        assert_close_to_solo(h.recorders[rid].pixels, expected[rid])


def test_higher_priority_is_admitted_first(harness: Any) -> None:
    h = harness(clock=FakeClock(), default_max_batch_rows=2)  # one guided job per batch
    for rid, priority in [("low", 1), ("normal", 2), ("high", 3), ("normal-2", 2), ("high-2", 3)]:
        h.submit(rid, params(priority=priority, num_inference_steps=1))
    h.batcher.start()
    h.wait_all()
    assert h.timeline.order_of(Started) == ["high", "high-2", "normal", "normal-2", "low"]


@pytest.mark.parametrize(("waited", "first"), [(4.0, "high"), (12.0, "low")])
def test_waiting_ages_a_low_priority_job_forward(harness: Any, waited: float, first: str) -> None:
    """Each `aging_seconds` of waiting is worth one level, so low priority never starves."""
    clock = FakeClock()
    h = harness(clock=clock, default_max_batch_rows=2, aging_seconds=5.0)
    h.submit("low", params(priority=1, num_inference_steps=1))
    clock.now += waited  # low: 1 + waited/5 levels; high, just arrived: 3
    h.submit("high", params(priority=3, num_inference_steps=1))
    h.batcher.start()
    h.wait_all()
    assert h.timeline.order_of(Started)[0] == first


def test_other_shape_waits_for_a_group_slot_and_is_not_overtaken(harness: Any) -> None:
    """With every shape-group slot taken (one here), same-shape jobs arriving after a
    different-shape job do not jump ahead of it: the running group drains first."""
    h = harness(default_max_batch_rows=8, max_shape_groups=1)
    running = h.submit("running-64", params(num_inference_steps=4))
    queued_up = threading.Event()

    def hold_engine_until_queue_filled(event: JobEvent) -> None:
        # Runs on the engine thread after step 1: the engine waits while the test
        # queues a different-shape job and then two jobs that could join the batch.
        if isinstance(event, Progress) and event.step == 1:
            assert queued_up.wait(WAIT)

    running.hooks.append(hold_engine_until_queue_filled)
    h.batcher.start()
    other = h.job("other-shape", params(width=48, height=64, num_inference_steps=2))
    h.batcher.submit(other)
    h.submit("same-shape-1", params(num_inference_steps=2, seed=8))
    h.submit("same-shape-2", params(num_inference_steps=2, seed=9))
    queued_up.set()
    h.wait_all()
    assert h.timeline.order_of(Started) == [
        "running-64",
        "other-shape",
        "same-shape-1",
        "same-shape-2",
    ]
    assert h.recorders["other-shape"].of(Queued)[0].position == 0
    # The two late same-shape jobs then share one batch.
    assert h.timeline.order_of(Finished)[-2:] == ["same-shape-1", "same-shape-2"]


def test_other_shape_shares_the_engine_step_by_step(tiny_pipeline: Any, harness: Any) -> None:
    """A short job of another shape starts at the next step and finishes while a long job
    runs, the two groups taking turns; both give the images they give alone."""
    long_params = params(num_inference_steps=12, num_outputs=2)
    short_params = params(width=48, height=64, num_inference_steps=3, seed=5)
    expected = {
        "long": solo(tiny_pipeline, long_params),
        "short": solo(tiny_pipeline, short_params),
    }
    h = harness(default_max_batch_rows=8)
    long_job = h.submit("long", long_params)
    queued_up = threading.Event()

    def hold_after_step_1(event: JobEvent) -> None:
        if isinstance(event, Progress) and event.step == 1:
            assert queued_up.wait(WAIT)

    long_job.hooks.append(hold_after_step_1)
    h.batcher.start()
    h.submit("short", short_params)
    queued_up.set()
    h.wait_all()
    assert h.timeline.order_of(Finished) == ["short", "long"]
    # The short job's three steps all ran before the long job's fifth.
    steps = [rid for rid, event in h.timeline.entries if isinstance(event, Progress)]
    assert [rid for rid in steps[: steps.index("short") + 5] if rid == "short"] == ["short"] * 3
    for rid, pixels in expected.items():
        assert_close_to_solo(h.recorders[rid].pixels, pixels)


def test_cancelling_one_member_leaves_the_others_unchanged(
    tiny_pipeline: Any, harness: Any
) -> None:
    requests = {
        "keep-1": params(prompt="a teapot", num_inference_steps=6, seed=1),
        "cancel-me": params(prompt="a storm", num_inference_steps=6, seed=2, num_outputs=2),
        "keep-2": params(prompt="a violin", num_inference_steps=5, seed=3, scheduler="DDIM"),
    }
    expected = {rid: solo(tiny_pipeline, p) for rid, p in requests.items() if rid != "cancel-me"}
    h = harness(default_max_batch_rows=8)
    for rid, p in requests.items():
        h.submit(rid, p)
    victim = h.recorders["cancel-me"]

    def cancel_after_step_2(event: JobEvent) -> None:
        if isinstance(event, Progress) and event.step == 2:
            h.batcher.cancel(h.jobs["cancel-me"])

    victim.hooks.append(cancel_after_step_2)
    h.batcher.start()
    for rid in expected:
        h.recorders[rid].wait()
    for rid, pixels in expected.items():
        assert_close_to_solo(h.recorders[rid].pixels, pixels)
    # The cancelled job stopped at the step boundary: no further step, no images.
    assert [event.step for event in victim.of(Progress)] == [1, 2]
    assert not victim.of(Decoded) and not victim.of(Finished)
    assert h.batcher.stats.jobs_cancelled == 1
    assert h.batcher.in_flight == 0


def test_full_queue_refuses_at_once_and_frees_slots(harness: Any) -> None:
    h = harness(max_queue=2)  # the engine thread is not started: nothing leaves the queue
    h.submit("one", params())
    h.submit("two", params())
    with pytest.raises(QueueFull) as raised:
        h.submit("three", params())
    assert raised.value.capacity == 2
    assert raised.value.retry_after >= 1.0
    assert h.recorders["three"].events == []  # a refused job hears nothing more
    h.batcher.cancel(h.jobs["one"])  # a cancelled waiting job frees its slot at once
    h.submit("four", params())
    assert h.batcher.in_flight == 2
    # "two" moved up to the head of the line when "one" left.
    assert [event.position for event in h.recorders["two"].of(Queued)] == [1, 0]


def test_draining_refuses_new_jobs_and_stop_fails_leftovers(harness: Any) -> None:
    h = harness()
    waiting = h.submit("waiting", params())
    assert h.batcher.drain(timeout=0) is False  # the job is still there
    with pytest.raises(Draining):
        h.submit("late", params())
    h.batcher.stop()
    failures = waiting.of(Failed)
    assert [failure.code for failure in failures] == ["UNAVAILABLE"]


def test_queued_positions_count_down_to_admission(harness: Any) -> None:
    h = harness(clock=FakeClock(), default_max_batch_rows=2)
    for rid in ("first", "second", "third"):
        h.submit(rid, params(num_inference_steps=1))
    h.batcher.start()
    h.wait_all()
    assert [event.position for event in h.recorders["third"].of(Queued)] == [2, 1, 0]
    third = h.recorders["third"].events
    assert isinstance(third[-1], Finished)
    assert [type(event) for event in third[3:]] == [Started, Progress, Decoded, Finished]


def test_completed_timings_are_consistent(harness: Any) -> None:
    h = harness()
    recorder = h.submit("timed", params(num_inference_steps=3))
    h.batcher.start()
    recorder.wait()
    (finished,) = recorder.of(Finished)
    assert finished.queue_seconds >= 0
    assert finished.inference_seconds >= 0
    assert finished.engine_seconds > 0
    assert finished.engine_seconds <= finished.queue_seconds + finished.inference_seconds
