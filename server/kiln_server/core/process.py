"""The engine core process: load and warm up the models, then run the batcher.

EngineCoreClient starts it as `python -m kiln_server.core.process FD PARENT_PID`, FD being
its end of a socket pair. The first message on it is StartCore. Then the main thread reads
commands (and answers a refused submit itself, as the batcher reports `queued` from it),
while the batcher's engine thread runs the denoising loop and its output thread moves
previews and images to the host; each sends the events it emits. A job's final images
cross to the API process in shared memory (kiln_server.core.shared_arrays): only the
block's name goes through the socket.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

import torch

from kiln_server.batcher import Batcher, BatcherSettings, Draining, Job, QueueFull
from kiln_server.core import shared_arrays
from kiln_server.core.messages import (
    CancelJob,
    CoreFailed,
    CoreReady,
    CoreStats,
    JobImages,
    JobUpdate,
    LibraryCommand,
    LibraryReply,
    Report,
    StartCore,
    StopCore,
    SubmitJob,
)
from kiln_server.events import Decoded, Failed, Finished, JobEvent, Refused
from kiln_server.library.residency import ModelLibrary
from kiln_server.library.state import LibraryStatus
from kiln_server.logs import configure_logging
from kiln_server.runtime import engine_placement

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# The engine core's exit code when its engine failed (EX_SOFTWARE).
ENGINE_FAILED_EXIT = 70
# Seconds between looks at the batcher's load and the memory; a CoreStats report goes out
# only when something changed.
STATS_INTERVAL = 0.5
_MIB = 1024 * 1024


def _resident_set_bytes() -> int:
    """This process's resident set size (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def device_memory(device: torch.device) -> tuple[tuple[str, int], ...]:
    """Resident bytes per device, rounded down to whole MiB so that allocator noise does not
    make every look a change: the process's RSS as "cpu", and what torch has allocated on
    the GPU the engines run on."""
    memory = [("cpu", _resident_set_bytes())]
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        memory.append((f"cuda:{index}", torch.cuda.memory_allocated(index)))
    return tuple((name, size // _MIB * _MIB) for name, size in memory)


class ReportSender:
    """Writes reports to the socket; safe to call from any thread.

    The engine thread sends its own small events rather than handing them to a sender
    thread: each hand-off would cost the engine thread an interpreter-lock switch, about 2%
    of a small model's step time, while a send is one short write. What is large or slow
    (previews to encode, final images) the batcher's output thread sends, and images
    travel in shared memory, so no report is large.
    """

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._lock = threading.Lock()
        self._closed = False

    def put(self, report: Report) -> bool:
        """Send one report: True once written; False (dropped quietly) when the API
        process is gone."""
        with self._lock:
            if self._closed:
                return False
            try:
                self._connection.send(report)
            except OSError:
                self._closed = True  # nobody is left to tell
                return False
            return True

    def close(self) -> None:
        """Send nothing more."""
        with self._lock:
            self._closed = True


class EngineCore:
    """The batcher behind the socket: jobs by id, their events back as JobUpdates, their
    images as JobImages in shared memory."""

    def __init__(self, batcher: Batcher, sender: ReportSender) -> None:
        self.batcher = batcher
        self.sender = sender
        self._jobs: dict[int, Job] = {}
        self._lock = threading.Lock()
        self._stats_stop = threading.Event()
        self._stats_thread: threading.Thread | None = None

    def start_stats(self) -> None:
        """Report the batcher's load and the memory from a thread of their own, so the
        engine thread never pays for it beyond one short hold of the batcher's lock."""
        self._stats_thread = threading.Thread(
            target=self._report_stats, name="kiln-core-stats", daemon=True
        )
        self._stats_thread.start()

    def _report_stats(self) -> None:
        last: CoreStats | None = None
        while not self._stats_stop.wait(STATS_INTERVAL):
            load = self.batcher.load()
            stats = CoreStats(
                pending=tuple(sorted(load.pending.items())),
                running_rows=tuple(sorted(load.running_rows.items())),
                memory=device_memory(self.batcher.device),
                lora_loads=tuple(sorted(load.lora_loads.items())),
                library=self.batcher.library.status() if self.batcher.library else None,
            )
            if stats != last and self.sender.put(stats):
                last = stats

    def _emitter(self, job_id: int) -> Callable[[JobEvent], None]:
        def emit(event: JobEvent) -> None:
            if isinstance(event, Finished | Failed):
                with self._lock:
                    self._jobs.pop(job_id, None)
            if isinstance(event, Decoded):
                try:
                    shared_arrays.send_array(
                        event.pixels, lambda block: self.sender.put(JobImages(job_id, block))
                    )
                    return
                except OSError as error:
                    logger.warning(
                        "no room in shared memory (%s); images go through the socket", error
                    )
                except Exception:  # the socket still works, and images must not be lost
                    logger.exception("shared memory failed; images go through the socket")
            self.sender.put(JobUpdate(job_id, event))

        return emit

    def submit(self, command: SubmitJob) -> None:
        """Queue the job, or report at once why it was refused."""
        job = Job(command.request_id, command.params, self._emitter(command.job_id))
        with self._lock:
            self._jobs[command.job_id] = job
        try:
            self.batcher.submit(job)
        except (QueueFull, Draining) as error:
            with self._lock:
                self._jobs.pop(command.job_id, None)
            retry_after = error.retry_after if isinstance(error, QueueFull) else None
            self.sender.put(JobUpdate(command.job_id, Refused(str(error), retry_after)))

    def cancel(self, command: CancelJob) -> None:
        """Cancel the job if it is still queued or running."""
        with self._lock:
            job = self._jobs.pop(command.job_id, None)
        if job is not None:
            self.batcher.cancel(job)

    def library_command(self, command: LibraryCommand) -> None:
        """Answer a model-library request; loads and unloads answer once settled."""
        library = self.batcher.library
        assert library is not None

        def reply(
            status: LibraryStatus, unloaded: tuple[str, ...], outcome: tuple[str, str]
        ) -> None:
            load = self.batcher.load()
            active = {
                name: load.pending.get(name, 0) + load.running_jobs.get(name, 0)
                for name in {*load.pending, *load.running_jobs}
            }
            self.sender.put(
                LibraryReply(
                    command.request_id,
                    status,
                    tuple(sorted(active.items())),
                    unloaded,
                    *outcome,
                )
            )

        if command.action == "load":
            library.request_load(command.model, reply)
        elif command.action == "unload":
            library.request_unload(command.model, reply)
        else:
            reply(library.status(), (), ("", ""))

    def serve(self, connection: Connection) -> None:
        """Handle commands until StopCore, or until the API process goes away."""
        while True:
            try:
                command = connection.recv()
            except (EOFError, OSError):
                logger.warning("the API process went away; the engine core stops")
                self.stop()
                return
            if isinstance(command, SubmitJob):
                self.submit(command)
            elif isinstance(command, CancelJob):
                self.cancel(command)
            elif isinstance(command, LibraryCommand):
                self.library_command(command)
            elif isinstance(command, StopCore):
                self.stop()
                return

    def stop(self) -> None:
        """Stop the batcher (failing leftovers with UNAVAILABLE), log its statistics."""
        self._stats_stop.set()
        self.batcher.stop()
        stats = self.batcher.stats
        logger.info(
            "batcher stats",
            extra={"steps": stats.steps, "rows": stats.rows, "jobs": stats.jobs_completed},
        )
        self.sender.close()


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to kill this process when the API process dies, even by SIGKILL.

    Without it a killed server would leave the engine core (and its memory) behind while
    it is still loading models, before it could notice the closed socket.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before the request above took effect
        sys.exit(1)


def run_engine_core(connection: Connection) -> None:
    """Load, warm up and serve jobs until StopCore or until the API process goes away."""
    try:
        start = connection.recv()
    except (EOFError, OSError):
        sys.exit(1)
    if not isinstance(start, StartCore):
        raise TypeError(f"the engine core expects StartCore first, not {type(start).__name__}")
    settings, registry = start.settings, start.registry
    # The core loads the models, so diffusers logs here too.
    configure_logging(settings.log_format, settings.log_level, ("transformers", "diffusers"))
    sender = ReportSender(connection)
    try:
        placement, threads = engine_placement(settings)
        library = ModelLibrary(registry, settings, placement, threads)
        models = library.load_at_start()
    except Exception as error:  # every start-up failure is reported, then the core exits
        logger.debug("start-up failed", exc_info=error)
        sender.put(CoreFailed(str(error) or type(error).__name__))
        sender.close()
        sys.exit(1)
    limits = {name: served.max_batch_rows for name, served in library.served.items()}

    def on_fatal(reason: str) -> None:
        # Every job has its INTERNAL status by now; tell the API process why, and go:
        # `kiln serve` then exits non-zero and its supervisor starts a fresh engine.
        logger.error("the engine failed; the engine core exits", extra={"why": reason})
        sender.put(CoreFailed(reason))
        sender.close()
        os._exit(ENGINE_FAILED_EXIT)

    batcher = Batcher(
        {name: model.pipeline for name, model in models.items()},
        BatcherSettings(
            max_queue=settings.max_queue,
            max_batch_rows=limits,
            default_max_batch_rows=settings.max_batch_rows,
            aging_seconds=settings.aging_seconds,
            max_shape_groups=settings.max_shape_groups,
            stall_seconds=settings.engine_stall_seconds,
        ),
        on_fatal=on_fatal,
        library=library,
    )
    shared_arrays.start_tracker()
    library.start()
    batcher.start()
    core = EngineCore(batcher, sender)
    sender.put(CoreReady(tuple(library.served.values()), library.status()))
    core.start_stats()
    core.serve(connection)


def main(argv: list[str]) -> None:
    """`python -m kiln_server.core.process FD PARENT_PID` (started by EngineCoreClient)."""
    if len(argv) != 2:
        sys.exit("usage: python -m kiln_server.core.process FD PARENT_PID (started by kiln serve)")
    _die_with_parent(int(argv[1]))
    # The API process owns shutdown: a Ctrl-C to the process group must not kill the
    # engine under requests that are still draining.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    run_engine_core(Connection(int(argv[0])))


if __name__ == "__main__":
    main(sys.argv[1:])
