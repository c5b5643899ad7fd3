"""Results leave the engine thread: previews and images on the output thread, images to the
API process through shared memory, and no shared-memory block outlives its request.

In-process tests run the real batcher over the tiny model and record on which thread each
step happens. End-to-end tests talk to a real `kiln serve` and look in /dev/shm for blocks
named after its engine core.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from e2e_support import (
    RPC_TIMEOUT,
    expect_error,
    generate,
    images,
    kinds,
    of_kind,
    open_stub,
    request,
    wait_for_log,
)
from PIL import Image

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_server.batcher import ENGINE_THREAD, OUTPUT_THREAD, Batcher, BatcherSettings, Job
from kiln_server.core import shared_arrays
from kiln_server.events import Decoded, Failed, Finished, JobEvent, Progress, Started
from kiln_server.pipeline.params import GenerationParams, PreviewParams

REPO_ROOT = Path(__file__).resolve().parents[1]
WAIT = 120.0  # bounds a job that should finish; never reached when all is well
EXIT_TIMEOUT = 60.0


# ----- shared memory on its own -----


def blocks_of(pid: int) -> list[str]:
    """Shared-memory blocks named after process `pid` that still exist."""
    return sorted(
        n for n in os.listdir("/dev/shm") if n.startswith(shared_arrays.block_prefix(pid))
    )


def plant_block(pid: int) -> str:
    """A block named as if process `pid` had created it and died before announcing it."""
    name = f"{shared_arrays.block_prefix(pid)}0123456789abcdef"
    block = SharedMemory(name=name, create=True, size=64)
    block.close()
    # Left to whoever sweeps it: this process must not unlink it at exit.
    resource_tracker.unregister("/" + name, "shared_memory")
    return name


def test_an_array_crosses_intact_and_its_block_is_unlinked_once_read() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (3, 40, 24, 3), dtype=np.uint8)
    sent: list[shared_arrays.SharedArray] = []

    def send(shared: shared_arrays.SharedArray) -> bool:
        sent.append(shared)
        return True

    assert shared_arrays.send_array(pixels, send)
    (shared,) = sent
    assert shared.name.startswith(shared_arrays.block_prefix(os.getpid()))
    assert blocks_of(os.getpid()) == [shared.name]
    received = shared_arrays.receive_array(shared)
    assert received.dtype == np.uint8 and np.array_equal(received, pixels)
    assert blocks_of(os.getpid()) == []


def test_a_block_nobody_could_be_told_about_is_unlinked_by_its_creator() -> None:
    pixels = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    assert not shared_arrays.send_array(pixels, lambda _shared: False)
    assert blocks_of(os.getpid()) == []

    def broken(_shared: shared_arrays.SharedArray) -> bool:
        raise OSError("socket closed")

    with pytest.raises(OSError):
        shared_arrays.send_array(pixels, broken)
    assert blocks_of(os.getpid()) == []


def test_blocks_of_a_dead_process_are_swept_and_a_live_ones_are_not() -> None:
    dead_pid = _dead_pid()
    dead = plant_block(dead_pid)
    alive = plant_block(os.getpid())
    try:
        assert shared_arrays.sweep_stale(min_age=3600) == 0  # too young to be called stale
        assert shared_arrays.sweep_stale(min_age=0) == 1
        assert blocks_of(dead_pid) == [] and blocks_of(os.getpid()) == [alive]
        assert shared_arrays.sweep(os.getpid()) == 1
        assert blocks_of(os.getpid()) == []
    finally:
        for name in (dead, alive):
            shared_arrays.discard(shared_arrays.SharedArray(name, (64,), "|u1"))


def _dead_pid() -> int:
    """The id of a process that has exited (and is not reused within the test)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


TRACKER_SCRIPT = textwrap.dedent(
    """
    import json, subprocess, sys
    import numpy as np
    from kiln_server.core import shared_arrays

    CREATE = '''
    import json, sys
    import numpy as np
    from kiln_server.core import shared_arrays
    shared_arrays.start_tracker()
    for fill in (7, 9):
        shared_arrays.send_array(
            np.full((2, 4, 4, 3), fill, np.uint8),
            lambda shared: print(json.dumps([shared.name, shared.shape, shared.dtype])) or True,
        )
    shared_arrays.send_array(np.zeros(4, np.uint8), lambda shared: False)
    '''
    out = subprocess.run(
        [sys.executable, "-c", CREATE], capture_output=True, text=True, check=True
    )
    sys.stderr.write(out.stderr)
    kept, dropped = [
        shared_arrays.SharedArray(n, tuple(s), d)
        for n, s, d in map(json.loads, out.stdout.splitlines())
    ]
    assert int(shared_arrays.receive_array(kept).max()) == 7
    shared_arrays.discard(dropped)
    print("ok")
    """
)


def test_the_resource_tracker_has_nothing_to_clean_up_in_either_process() -> None:
    """Python 3.11 registers a block in the creating and in every attaching process; an
    unbalanced registration shows up at exit as a 'leaked shared_memory' warning."""
    done = subprocess.run(
        [sys.executable, "-c", TRACKER_SCRIPT],
        capture_output=True,
        text=True,
        timeout=WAIT,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert "resource_tracker" not in done.stderr and "leaked" not in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


# ----- the batcher's engine thread and output thread -----


class ThreadRecordingPipeline:
    """The tiny pipeline, noting which thread runs each engine call and each encoding.

    `encode_delay` makes the output thread slow, so later events of a job would overtake
    its previews if ordering were not kept.
    """

    def __init__(self, inner: Any, encode_delay: float = 0.0) -> None:
        self.inner = inner
        self.encode_delay = encode_delay
        self.threads: dict[str, set[str]] = {}
        self.previewer = self
        self._lock = threading.Lock()

    def _note(self, what: str) -> None:
        with self._lock:
            self.threads.setdefault(what, set()).add(threading.current_thread().name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def denoise_step(self, states: list[Any]) -> Any:
        self._note("denoise_step")
        return self.inner.denoise_step(states)

    def decode(self, state: Any) -> Any:
        self._note("decode")
        return self.inner.decode(state)

    def preview_pixels(self, state: Any, method: str | None = None, size: int | None = None) -> Any:
        self._note("preview_pixels")
        return self.inner.preview_pixels(state, method, size)

    def encode(self, pixels: np.ndarray, max_size: int, image_format: str, quality: int) -> Any:
        self._note("encode")
        assert isinstance(pixels, np.ndarray)  # on the host by the time it is encoded
        time.sleep(self.encode_delay)
        return self.inner.previewer.encode(pixels, max_size, image_format, quality)


class Recorder:
    """A job's emit callback: its events and the thread each was emitted on."""

    def __init__(self) -> None:
        self.events: list[tuple[JobEvent, str]] = []
        self.done = threading.Event()

    def __call__(self, event: JobEvent) -> None:
        self.events.append((event, threading.current_thread().name))
        if isinstance(event, Finished | Failed):
            self.done.set()

    def wait(self) -> None:
        assert self.done.wait(WAIT), self.events

    def of(self, kind: type) -> list[Any]:
        return [event for event, _ in self.events if isinstance(event, kind)]

    def threads_of(self, kind: type) -> set[str]:
        return {thread for event, thread in self.events if isinstance(event, kind)}


def tiny_params(**overrides: Any) -> GenerationParams:
    fields: dict[str, Any] = {
        "prompt": "a teapot",
        "num_inference_steps": 6,
        "seed": 3,
        "model": "tiny",
        "width": 64,
        "height": 64,
        **overrides,
    }
    return GenerationParams(**fields)


@pytest.fixture
def run_jobs(tiny_pipeline: Any) -> Iterator[Any]:
    """Run jobs to the end on a started batcher over a ThreadRecordingPipeline."""
    batchers: list[Batcher] = []

    def run(pipeline: ThreadRecordingPipeline, *requests: GenerationParams) -> list[Recorder]:
        batcher = Batcher({"tiny": pipeline}, BatcherSettings())
        batchers.append(batcher)
        recorders = [Recorder() for _ in requests]
        for index, (params, recorder) in enumerate(zip(requests, recorders, strict=True)):
            batcher.submit(Job(f"job-{index}", params, recorder))
        batcher.start()
        for recorder in recorders:
            recorder.wait()
        return recorders

    yield run
    for batcher in batchers:
        batcher.stop()


def test_the_engine_thread_runs_engines_and_the_output_thread_the_rest(
    tiny_pipeline: Any, run_jobs: Any
) -> None:
    pipeline = ThreadRecordingPipeline(tiny_pipeline)
    params = tiny_params(num_outputs=2, preview=PreviewParams(every_n_steps=2))
    (recorder,) = run_jobs(pipeline, params)
    assert pipeline.threads["denoise_step"] == {ENGINE_THREAD}
    assert pipeline.threads["decode"] == {ENGINE_THREAD}
    assert pipeline.threads["preview_pixels"] == {ENGINE_THREAD}
    assert pipeline.threads["encode"] == {OUTPUT_THREAD}
    # Final images reach the host, and their listener, off the engine thread.
    assert recorder.threads_of(Decoded) == {OUTPUT_THREAD}
    (decoded,) = recorder.of(Decoded)
    assert isinstance(decoded.pixels, np.ndarray)
    assert np.array_equal(decoded.pixels, np.stack(tiny_pipeline.generate(params)))


def test_a_step_without_a_preview_is_reported_straight_from_the_engine_thread(
    tiny_pipeline: Any, run_jobs: Any
) -> None:
    """No thread switch per plain progress event when nothing is pending for the job."""
    pipeline = ThreadRecordingPipeline(tiny_pipeline)
    (recorder,) = run_jobs(pipeline, tiny_params())
    assert recorder.threads_of(Started) == {ENGINE_THREAD}
    assert recorder.threads_of(Progress) == {ENGINE_THREAD}
    assert "encode" not in pipeline.threads


def test_events_keep_their_order_behind_a_slow_output_thread(
    tiny_pipeline: Any, run_jobs: Any
) -> None:
    pipeline = ThreadRecordingPipeline(tiny_pipeline, encode_delay=0.05)
    steps = 7
    previewed = tiny_params(num_inference_steps=steps, preview=PreviewParams(every_n_steps=3))
    plain = tiny_params(num_inference_steps=steps - 2, seed=9)
    slow, fast = run_jobs(pipeline, previewed, plain)
    kinds_in_order = [type(event).__name__ for event, _ in slow.events]
    assert kinds_in_order == ["Queued", "Started"] + ["Progress"] * steps + [
        "Decoded",
        "Finished",
    ]
    progress = slow.of(Progress)
    assert [event.step for event in progress] == list(range(1, steps + 1))
    assert [event.step for event in progress if event.preview] == [3, 6, 7]
    # Plain steps queued behind a pending preview go out on the output thread, in order.
    assert OUTPUT_THREAD in slow.threads_of(Progress)
    assert [event.step for event in fast.of(Progress)] == list(range(1, steps - 1))
    assert isinstance(fast.events[-1][0], Finished)


def test_a_failing_preview_encoder_costs_the_preview_not_the_job(
    tiny_pipeline: Any, run_jobs: Any
) -> None:
    class BrokenEncoder(ThreadRecordingPipeline):
        def encode(self, *_args: Any) -> Any:
            raise RuntimeError("encoder broke")

    pipeline = BrokenEncoder(tiny_pipeline)
    (recorder,) = run_jobs(pipeline, tiny_params(preview=PreviewParams(every_n_steps=1)))
    assert [event.step for event in recorder.of(Progress)] == list(range(1, 7))
    assert all(event.preview is None for event in recorder.of(Progress))
    assert len(recorder.of(Decoded)) == 1 and len(recorder.of(Finished)) == 1


# ----- end to end through a real server -----


def core_pid(server: Any) -> int:
    """Process id of the server's engine core, from its start-up log."""
    record = wait_for_log(server.logs, lambda r: r["message"] == "engine core started")
    return int(record["pid"])


def png_pixels(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def test_images_arrive_bit_exact_through_shared_memory(
    kiln_server: Any, tiny_pipeline: Any
) -> None:
    fields: dict[str, Any] = {
        "seed": 41,
        "num_outputs": 3,
        "width": 64,
        "height": 48,
        "num_inference_steps": 3,
        "guidance_scale": 5.0,
        "scheduler": "K_EULER",
    }
    with open_stub(kiln_server.address) as stub:
        events = generate(
            stub, request("a lighthouse", preview={"every_n_steps": 1, "max_size": 64}, **fields)
        )
    assert kinds(events)[-4:] == ["image", "image", "image", "completed"]
    progress = of_kind(events, "progress")
    assert [p.step for p in progress] == [1, 2, 3] and all(p.preview for p in progress)
    served = np.stack([png_pixels(image.data) for image in images(events)])
    expected = np.stack(tiny_pipeline.generate(GenerationParams(prompt="a lighthouse", **fields)))
    assert served.shape == (3, 48, 64, 3)
    assert np.array_equal(served, expected)
    assert blocks_of(core_pid(kiln_server)) == []


def test_images_of_a_request_cancelled_before_they_arrive_are_unlinked(kiln_server: Any) -> None:
    pid = core_pid(kiln_server)
    # Its decode (two 256x256 images) outlasts the cancel: the images arrive after it.
    slow_decode = request(seed=8, num_outputs=2, width=256, height=256, num_inference_steps=2)
    with open_stub(kiln_server.address) as stub:
        call = stub.Generate(slow_decode, timeout=RPC_TIMEOUT)
        for event in call:
            if event.WhichOneof("event") == "progress" and event.progress.step == 2:
                call.cancel()
                break
        error = expect_error(lambda: list(call))
        assert error.code() == grpc.StatusCode.CANCELLED
        # The core finishes jobs in order: once the next one completes, the cancelled
        # job's images have arrived, and their block must be gone.
        follow_up = generate(stub, request(seed=9, num_inference_steps=2))
    assert kinds(follow_up)[-1] == "completed"
    assert blocks_of(pid) == []


def test_a_killed_core_leaves_no_blocks(server_factory: Any) -> None:
    server = server_factory("--backend", "torch")
    pid = core_pid(server)
    with open_stub(server.address) as stub:
        assert kinds(generate(stub, request(seed=2, num_outputs=2, num_inference_steps=2)))[-1] == (
            "completed"
        )
        # As if the core had died between writing a block and announcing it.
        planted = plant_block(pid)
        assert blocks_of(pid) == [planted]
        with ThreadPoolExecutor(1) as pool:
            call = stub.Generate(request(seed=3, num_inference_steps=150), timeout=RPC_TIMEOUT)
            next(e for e in call if e.WhichOneof("event") == "progress")
            rest = pool.submit(list, call)
            os.kill(pid, signal.SIGKILL)
            error = expect_error(lambda: rest.result(timeout=RPC_TIMEOUT))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert server.process.wait(timeout=EXIT_TIMEOUT) == 1
    assert blocks_of(pid) == []


def test_a_stopped_server_leaves_no_blocks_and_no_tracker_warnings(server_factory: Any) -> None:
    server = server_factory("--backend", "torch")
    pid = core_pid(server)
    with open_stub(server.address) as stub, ThreadPoolExecutor(3) as pool:
        calls = [
            pool.submit(
                generate,
                stub,
                request(seed=seed, num_outputs=2, num_inference_steps=3, output_format=fmt),
            )
            for seed, fmt in [
                (1, pb.OUTPUT_FORMAT_PNG),
                (2, pb.OUTPUT_FORMAT_JPEG),
                (3, pb.OUTPUT_FORMAT_WEBP),
            ]
        ]
        for call in calls:
            assert kinds(call.result())[-1] == "completed"
    assert server.terminate() == 0
    logs = server.logs()
    assert "resource_tracker" not in logs and "leaked" not in logs, logs
    assert "Traceback" not in logs, logs
    assert "no room in shared memory" not in logs
    assert blocks_of(pid) == []
