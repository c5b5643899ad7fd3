"""The API process's handle on the engine core process.

EngineCoreClient starts the core, waits for it to report its models ready, and routes
each job's events (read by a reader thread) to the callback given at submit. If the core
dies, every job still in flight ends with UNAVAILABLE and the owner is told, so no request
is ever left waiting.
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

from kiln_server.core.messages import (
    CancelJob,
    Command,
    CoreFailed,
    CoreReady,
    JobUpdate,
    ServedModel,
    StartCore,
    StopCore,
    SubmitJob,
)
from kiln_server.events import Failed, Finished, JobEvent, Refused
from kiln_server.models.registry import ModelRegistry
from kiln_server.pipeline.params import GenerationParams
from kiln_server.settings import ServerSettings

logger = logging.getLogger(__name__)

EventCallback = Callable[[JobEvent], None]
_TERMINAL = (Finished, Failed, Refused)


class EngineCoreError(RuntimeError):
    """The engine core could not start, or is gone."""


class EngineCoreClient:
    """Starts the engine core process and exchanges jobs and events with it.

    `submit`, `cancel` and `stop` are called from one thread (the event loop's); event
    callbacks run on the reader thread and must be thread-safe.
    """

    def __init__(
        self,
        settings: ServerSettings,
        registry: ModelRegistry,
        on_unexpected_exit: Callable[[str], None] = lambda _message: None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.on_unexpected_exit = on_unexpected_exit
        self._jobs: dict[int, EventCallback] = {}
        self._idle = threading.Condition()
        self._ids = itertools.count(1)
        self._ready: concurrent.futures.Future[tuple[ServedModel, ...]] = (
            concurrent.futures.Future()
        )
        self._stopping = False
        self._exited = False
        self._connection: Connection | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        """Process id of the engine core, once started."""
        return self._process.pid if self._process else None

    def start(self) -> None:
        """Start the core process; it loads and warms up every model of the registry.

        The core is a fresh interpreter (`python -m kiln_server.core.process`) rather than
        a multiprocessing child, so it never re-imports whatever script started the
        server. Its end of a socket pair is its only link to this process.
        """
        ours, theirs = socket.socketpair()
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
            )
        self._connection = Connection(ours.detach())
        self._send(StartCore(self.settings, self.registry))
        self._reader = threading.Thread(target=self._read, name="kiln-core-reader", daemon=True)
        self._reader.start()
        logger.info("engine core started", extra={"pid": self._process.pid})

    async def ready(self) -> tuple[ServedModel, ...]:
        """Wait until every model is loaded and warm; raise EngineCoreError if start-up fails."""
        return await asyncio.wrap_future(self._ready)

    def submit(self, request_id: str, params: GenerationParams, on_event: EventCallback) -> int:
        """Send a job to the core; its events arrive through `on_event`. Returns its id."""
        job_id = next(self._ids)
        with self._idle:
            if self._exited:
                raise EngineCoreError("the engine core has exited")
            self._jobs[job_id] = on_event
        try:
            self._send(SubmitJob(job_id, request_id, params))
        except EngineCoreError:
            with self._idle:
                self._jobs.pop(job_id, None)
            raise
        return job_id

    def cancel(self, job_id: int) -> None:
        """Drop a job that is still queued or running; a finished job is left alone."""
        with self._idle:
            active = self._jobs.pop(job_id, None) is not None
            self._idle.notify_all()
        if active:
            # A dead core runs nothing that would need cancelling.
            with contextlib.suppress(EngineCoreError):
                self._send(CancelJob(job_id))

    @property
    def in_flight(self) -> int:
        """Jobs submitted that have not ended yet."""
        with self._idle:
            return len(self._jobs)

    def wait_idle(self, timeout: float | None) -> bool:
        """Block until no job is in flight (True) or the timeout passes (False)."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._jobs, timeout)

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop the core: jobs still in it end with UNAVAILABLE; it exits.

        A core still loading models has no work to finish and is killed at once.
        """
        self._stopping = True
        if self._process is None:
            return
        if not self._ready.done():
            self._process.kill()
        else:
            with contextlib.suppress(EngineCoreError):
                self._send(StopCore())
        try:
            await asyncio.to_thread(self._process.wait, timeout)
        except subprocess.TimeoutExpired:
            logger.warning("engine core did not stop in time; killing it")
            self._process.kill()
            await asyncio.to_thread(self._process.wait, 5)
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
        assert self._connection is not None
        while True:
            try:
                report = self._connection.recv()
            except (EOFError, OSError):
                break
            if isinstance(report, JobUpdate):
                self._deliver(report)
            elif isinstance(report, CoreReady):
                self._ready.set_result(report.models)
            elif isinstance(report, CoreFailed):
                self._ready.set_exception(EngineCoreError(report.message))
        self._core_exited()

    def _deliver(self, update: JobUpdate) -> None:
        with self._idle:
            if isinstance(update.event, _TERMINAL):
                callback = self._jobs.pop(update.job_id, None)
                self._idle.notify_all()
            else:
                callback = self._jobs.get(update.job_id)
        if callback is not None:  # None: the API side cancelled and stopped listening
            callback(update.event)

    def _core_exited(self) -> None:
        """The pipe closed: end every job still waiting and tell the owner if unexpected."""
        assert self._process is not None
        try:
            code: int | None = self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        if self._stopping:
            message = "the server stopped before this request finished"
        elif not self._ready.done():
            message = f"the engine core exited during start-up (exit code {code})"
            self._ready.set_exception(EngineCoreError(message))
        else:
            message = f"the engine core exited unexpectedly (exit code {code})"
        with self._idle:
            self._exited = True
            orphans = list(self._jobs.values())
            self._jobs.clear()
            self._idle.notify_all()
        for callback in orphans:
            callback(Failed("UNAVAILABLE", message))
        if not self._stopping and self._ready.done() and self._ready.exception() is None:
            logger.error(message)
            self.on_unexpected_exit(message)
