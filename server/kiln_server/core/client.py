"""The API process's handle on the engine core process.

EngineCoreClient starts the core, waits for it to report its models ready, and routes
each job's events (read by a reader thread) to the callback given at submit, and the
core's periodic load and memory reports (CoreStats) to `on_stats`. A job's final
images arrive in shared memory: the reader copies them out and unlinks the block before
the callback sees them, and unlinks the blocks of jobs nobody listens to any more, so no
block outlives its message. If the core dies, or its messages stop making sense, every job
still in flight ends with UNAVAILABLE, the blocks the core left are removed, and the owner
is told, so no request is ever left waiting.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

from kiln_server.core import shared_arrays
from kiln_server.core.messages import (
    CancelJob,
    Command,
    CoreFailed,
    CoreReady,
    CoreStats,
    JobImages,
    JobUpdate,
    LibraryCommand,
    LibraryReply,
    Report,
    ServedModel,
    StartCore,
    StopCore,
    SubmitJob,
)
from kiln_server.events import Decoded, Failed, Finished, JobEvent, Refused
from kiln_server.library.state import LibraryStatus
from kiln_server.models.registry import ModelRegistry
from kiln_server.pipeline.params import GenerationParams
from kiln_server.settings import ServerSettings

logger = logging.getLogger(__name__)

EventCallback = Callable[[JobEvent], None]
_TERMINAL = (Finished, Failed, Refused)
# Longer than the core's own wait for its engine thread, so a core that is finishing a
# step when told to stop is not killed for it.
STOP_TIMEOUT = 60.0


class EngineCoreError(RuntimeError):
    """The engine core could not start, or is gone."""


class EngineCoreClient:
    """Starts the engine core process and exchanges jobs and events with it.

    `start`, `submit`, `cancel` and `stop` are called from the event loop's thread; event
    callbacks run on the reader thread and must be thread-safe.
    """

    def __init__(
        self,
        settings: ServerSettings,
        registry: ModelRegistry,
        on_unexpected_exit: Callable[[str], None] = lambda _message: None,
        on_stats: Callable[[CoreStats], None] = lambda _stats: None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.on_unexpected_exit = on_unexpected_exit
        self.on_stats = on_stats
        self._jobs: dict[int, EventCallback] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._ready: concurrent.futures.Future[tuple[ServedModel, ...]] = (
            concurrent.futures.Future()
        )
        self._loaded = threading.Event()
        self._stopping = False
        self._exited = False
        self._failure: str | None = None
        self._connection: Connection | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._library_replies: dict[int, concurrent.futures.Future[LibraryReply]] = {}
        # The model library as the core last reported it (None before it is ready).
        self.library_status: LibraryStatus | None = None

    def start(self) -> None:
        """Start the core process; it loads and warms up every model of the registry.

        The core is a fresh interpreter (`python -m kiln_server.core.process`) rather than
        a multiprocessing child, so it never re-imports whatever script started the
        server. Its end of a socket pair is its only link to this process. It runs in its
        own process group, so a Ctrl-C meant for the server reaches only this process,
        which then drains. Call from the main thread: Linux ties the core's life to the
        thread that started it (PR_SET_PDEATHSIG), and the main thread lives as long as
        the server.
        """
        swept = shared_arrays.sweep_stale()
        if swept:
            logger.warning("removed %d shared-memory blocks left by a killed server", swept)
        shared_arrays.start_tracker()
        ours, theirs = socket.socketpair()
        try:
            with theirs:
                self._process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "kiln_server.core.process",
                        str(theirs.fileno()),
                        str(os.getpid()),
                    ],
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                    process_group=0,
                )
        except BaseException:
            ours.close()
            raise
        self._connection = Connection(ours.detach())
        self._send(StartCore(self.settings, self.registry))
        self._reader = threading.Thread(target=self._read, name="kiln-core-reader", daemon=True)
        self._reader.start()
        logger.info("engine core started", extra={"pid": self._process.pid})

    async def ready(self) -> tuple[ServedModel, ...]:
        """Wait until every model is loaded and warm; raise EngineCoreError if start-up fails.

        Cancelling the wait (a shutdown during start-up) leaves the start-up itself alone.
        """
        waiter = asyncio.wrap_future(self._ready)
        # Once nobody awaits it, its outcome is retrieved here rather than logged as lost.
        waiter.add_done_callback(lambda done: done.cancelled() or done.exception())
        return await asyncio.shield(waiter)

    def submit(self, request_id: str, params: GenerationParams, on_event: EventCallback) -> int:
        """Send a job to the core; its events arrive through `on_event`. Returns its id."""
        job_id = next(self._ids)
        with self._lock:
            if self._exited:
                raise EngineCoreError("the engine core has exited")
            self._jobs[job_id] = on_event
        try:
            self._send(SubmitJob(job_id, request_id, params))
        except EngineCoreError:
            with self._lock:
                self._jobs.pop(job_id, None)
            raise
        return job_id

    async def library(self, action: str, model: str = "") -> LibraryReply:
        """Ask the core's model library for its status ("status"), or to "load" or
        "unload" `model`; returns once the action is settled. Raises EngineCoreError when
        the core is gone."""
        request_id = next(self._ids)
        reply: concurrent.futures.Future[LibraryReply] = concurrent.futures.Future()
        with self._lock:
            if self._exited:
                raise EngineCoreError("the engine core has exited")
            self._library_replies[request_id] = reply
        try:
            self._send(LibraryCommand(request_id, action, model))
            return await asyncio.wrap_future(reply)
        finally:
            with self._lock:
                self._library_replies.pop(request_id, None)

    def cancel(self, job_id: int) -> bool:
        """Drop a job still queued or running (True); an ended job is left alone (False)."""
        with self._lock:
            active = self._jobs.pop(job_id, None) is not None
        if active:
            # A dead core runs nothing that would need cancelling.
            with contextlib.suppress(EngineCoreError):
                self._send(CancelJob(job_id))
        return active

    async def stop(self) -> None:
        """Stop the core and wait for it to exit. Safe to call more than once.

        A loaded core fails the jobs it still holds with UNAVAILABLE, then exits. A core
        still loading models has no work to finish and is killed at once.
        """
        self._stopping = True
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            if self._loaded.is_set():
                with contextlib.suppress(EngineCoreError):
                    self._send(StopCore())
            else:
                process.kill()
        try:
            await asyncio.to_thread(process.wait, STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            logger.warning("engine core did not stop in %g s; killing it", STOP_TIMEOUT)
            process.kill()
            await asyncio.to_thread(process.wait)
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, 5)

    def _send(self, command: Command) -> None:
        if self._connection is None:
            raise EngineCoreError("the engine core is not running")
        try:
            self._connection.send(command)
        except OSError as error:
            raise EngineCoreError(f"the engine core is gone ({error})") from error

    def _read(self) -> None:
        assert self._connection is not None and self._process is not None
        broken = False
        try:
            while True:
                try:
                    report = self._connection.recv()
                except (EOFError, OSError):
                    break
                self._handle(report)
        except Exception:
            # An unreadable message means the stream can no longer be trusted.
            logger.exception("lost track of the engine core's messages; stopping it")
            broken = True
            self._process.kill()
        finally:
            self._core_exited(broken)
            self._connection.close()

    def _handle(self, report: Report) -> None:
        if isinstance(report, JobUpdate):
            self._deliver(report)
        elif isinstance(report, JobImages):
            self._deliver_images(report)
        elif isinstance(report, LibraryReply):
            with self._lock:
                waiter = self._library_replies.get(report.request_id)
            self.library_status = report.status
            if waiter is not None and not waiter.done():
                waiter.set_result(report)
        elif isinstance(report, CoreStats):
            if report.library is not None:
                self.library_status = report.library
            try:
                self.on_stats(report)
            except Exception:  # statistics must never stop the jobs' events
                logger.exception("handling the engine core's statistics failed")
        elif isinstance(report, CoreReady):
            self.library_status = report.library
            self._loaded.set()
            self._ready.set_result(report.models)
        elif isinstance(report, CoreFailed):
            if self._loaded.is_set():  # the engine failed while serving; the core exits
                logger.error("the engine core failed: %s", report.message)
                self._failure = report.message
            else:
                self._ready.set_exception(EngineCoreError(report.message))

    def _deliver(self, update: JobUpdate) -> None:
        with self._lock:
            if isinstance(update.event, _TERMINAL):
                callback = self._jobs.pop(update.job_id, None)
            else:
                callback = self._jobs.get(update.job_id)
        if callback is not None:  # None: the API side cancelled and stopped listening
            self._call(callback, update.event)

    def _deliver_images(self, report: JobImages) -> None:
        with self._lock:
            callback = self._jobs.get(report.job_id)
        if callback is None:  # cancelled, or its client went away: only the block is left
            shared_arrays.discard(report.pixels)
            return
        try:
            pixels = shared_arrays.receive_array(report.pixels)
        except FileNotFoundError:  # only a core that died can lose a block it sent
            with self._lock:
                self._jobs.pop(report.job_id, None)
            self._call(callback, Failed("UNAVAILABLE", "the engine core lost the images"))
            return
        except (OSError, ValueError):  # out of file handles or memory: this job only
            logger.exception("cannot read a request's images from shared memory")
            with contextlib.suppress(OSError):
                shared_arrays.discard(report.pixels)
            with self._lock:
                self._jobs.pop(report.job_id, None)
            self._call(callback, Failed("INTERNAL", "the server could not read the images"))
            return
        self._call(callback, Decoded(pixels))

    @staticmethod
    def _call(callback: EventCallback, event: JobEvent) -> None:
        try:
            callback(event)
        except Exception:  # one listener's fault must not stop the others' events
            logger.exception("an event callback failed")

    def _core_exited(self, broken: bool) -> None:
        """The core is gone: end every job still waiting; tell the owner if unexpected."""
        assert self._process is not None
        try:
            code: int | None = self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        else:
            # Blocks it created but never announced (it died between the two).
            shared_arrays.sweep(self._process.pid)
        unexpected = not self._stopping and self._loaded.is_set()
        if self._stopping:
            message = "the server stopped before this request finished"
        elif not self._loaded.is_set():
            message = f"the engine core exited during start-up (exit code {code})"
        elif broken:
            message = "the engine core was stopped after a broken message"
        elif self._failure is not None:
            message = f"the engine core failed ({self._failure}); the server restarts"
        else:
            message = f"the engine core exited unexpectedly (exit code {code})"
        if not self._ready.done():
            self._ready.set_exception(EngineCoreError(message))
        with self._lock:
            self._exited = True
            orphans = list(self._jobs.values())
            self._jobs.clear()
            waiters = list(self._library_replies.values())
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(EngineCoreError(message))
        for callback in orphans:
            self._call(callback, Failed("UNAVAILABLE", message))
        if unexpected:
            logger.error(message)
            self.on_unexpected_exit(message)
