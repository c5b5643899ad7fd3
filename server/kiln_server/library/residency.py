"""Which configured models are resident, within a memory budget; the others load on use.

Contract. Start-up (`load_at_start`, before the engine thread runs) loads every configured
model once, in registry order: that checks it loads and warms up, measures its bytes, and
gives its engines' declared limits to validation and ListModels. A model is kept resident
while the resident models fit the budget (`--model-memory-budget`; 0 keeps them all) and
unloaded again otherwise; the registry's default model is loaded first and always kept
(start-up fails when it alone exceeds the budget). Peak memory at start-up is therefore the
budget plus the largest model that did not fit.

After start-up the batcher's engine thread calls `refresh` between steps with the models
of the running jobs and the models the waiting jobs want (in admission order). `refresh`
1. installs the model the loader thread has finished loading (engine thread only, so no
   step sees a model half in place) and reports the one whose load failed, once;
2. carries out admin unloads: only an idle model (nothing queued or running) is unloaded;
3. starts the next load: the first wanted model that is not resident. When it does not
   fit beside the resident models, the least recently used idle ones are unloaded first
   (never one with running jobs); when even that is not enough it is reported `blocked`,
   and the batcher admits nothing ranked behind its jobs, so the busy models drain and
   it gets its turn.
Loads run one at a time on the `kiln-model-loader` thread while the engine thread goes on
stepping the other models; the jobs of the loading model wait queued (they see `queued`
events, never an error). A model that fails to load fails the jobs waiting for it with
UNAVAILABLE naming the cause; the next request for it tries again.

Memory is counted from what the engines hold (kiln_server.library.memory), measured when
the model loads. Activations and workspaces of running steps are outside the budget: leave
the device room for them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace

from kiln_server.core.messages import ServedModel
from kiln_server.engines.device import Placement, bind_thread
from kiln_server.library.budget import Resident, choose_evictions, fits_alone
from kiln_server.library.memory import engine_set_bytes, release_memory
from kiln_server.library.state import LibraryStatus, ModelState, ModelStatus
from kiln_server.models.registry import ModelRegistry
from kiln_server.pipeline.kinds import Pipeline
from kiln_server.runtime import (
    LoadedModel,
    batch_row_limit,
    load_model,
    serve_loras,
    warm_up,
)
from kiln_server.settings import ServerSettings

logger = logging.getLogger(__name__)

LOADER_THREAD = "kiln-model-loader"

# Called with (status, unloaded models, error) when an admin load or unload is settled;
# error is ("", "") on success, else (gRPC code name, message).
AdminReply = Callable[[LibraryStatus, tuple[str, ...], tuple[str, str]], None]


def _mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB"


@dataclass
class ResidencyChanges:
    """What one `refresh` changed, for the batcher to apply on the engine thread.

    `installed`: models now resident, by name, with their pipelines; `removed`: models
    unloaded (their pipelines must be dropped); `failed`: models whose load failed, with
    the message their waiting jobs get; `blocked`: models waiting for busy ones to make
    room.
    """

    installed: dict[str, Pipeline] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    blocked: set[str] = field(default_factory=set)


@dataclass
class _Entry:
    status: ModelStatus
    model: LoadedModel | None = None
    admin_loads: list[AdminReply] = field(default_factory=list)
    # The models unloaded to make room for its current load.
    evicted_for: tuple[str, ...] = ()


class ModelLibrary:
    """The configured models of one engine core and which of them are resident.

    `load_at_start` runs before the engine thread; `refresh` belongs to the engine thread;
    `status`, `request_load` and `request_unload` may be called from any thread.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        settings: ServerSettings,
        placement: Placement,
        threads: int,
        clock: Callable[[], float] = time.monotonic,
        loader: Callable[[str], LoadedModel] | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.placement = placement
        self.threads = threads
        self.budget = settings.model_memory_budget
        self.clock = clock
        # Called (from any thread) when the engine thread should call `refresh`.
        self.on_change: Callable[[], None] = lambda: None
        self._load_model = loader or self._load_and_warm
        self._lock = threading.Lock()
        self._entries = {
            name: _Entry(ModelStatus(name, ModelState.ON_DISK)) for name in registry.models
        }
        self._loading: str | None = None
        self._finished: list[tuple[str, LoadedModel | None, str]] = []
        self._unloads: list[tuple[str, AdminReply]] = []
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # What each model's engines run, learned at start-up (the same after a reload).
        self.served: dict[str, ServedModel] = {}

    # ----- loading -----

    def _load_and_warm(self, name: str) -> LoadedModel:
        """Read, place and warm up one model (any thread)."""
        settings = self.settings
        spec = self.registry.models[name]
        model = load_model(
            spec, settings.backend, settings.engines, settings.config, self.threads, self.placement
        )
        serve_loras(model, settings)
        rows: Sequence[int] = ()
        if self.placement.compile or self.placement.cuda_graphs:
            rows = range(1, batch_row_limit(model, settings.max_batch_rows) + 1)
        warm_up(model, rows)
        return model

    @staticmethod
    def model_bytes(model: LoadedModel) -> int:
        """Bytes a loaded model holds: its engines, plus its LoRA adapter stack."""
        stack = model.pipeline.loras.stack.memory_bytes() if model.pipeline.loras else 0
        return engine_set_bytes(model.pipeline.engines) + stack

    def load_at_start(self) -> dict[str, LoadedModel]:
        """Load every configured model once (module docstring); return the resident ones.

        Raises the load's error for a model that cannot load, and SettingsError-worthy
        ValueError when the default model alone exceeds the budget.
        """
        resident: dict[str, LoadedModel] = {}
        names = [self.registry.default_model] + [
            n for n in self.registry.models if n != self.registry.default_model
        ]
        used = 0
        for name in names:
            logger.info("loading model", extra={"model": name})
            model = self._load_model(name)
            size = self.model_bytes(model)
            pipeline = model.pipeline
            self.served[name] = ServedModel(
                name,
                pipeline.backend,
                batch_row_limit(model, self.settings.max_batch_rows),
                pipeline.limits,
                pipeline.engines.placement,
                pipeline.engines.reason,
            )
            keep = name == self.registry.default_model or self.budget == 0
            keep = keep or used + size <= self.budget
            if name == self.registry.default_model and not fits_alone(size, self.budget):
                raise ValueError(
                    f"the default model {name!r} needs {_mib(size)} but the model memory "
                    f"budget is {_mib(self.budget)}: raise --model-memory-budget (or set 0 "
                    "for no budget)"
                )
            entry = self._entries[name]
            entry.status = replace(entry.status, memory_bytes=size, loads=1, last_used=self.clock())
            if keep:
                used += size
                entry.model = model
                entry.status = replace(entry.status, state=ModelState.RESIDENT)
                resident[name] = model
            else:
                self._close(model)
                del model
                release_memory(self.placement.device)
                logger.info(
                    "model checked and left on disk: it does not fit the memory budget",
                    extra={"model": name, "bytes": size, "budget": self.budget},
                )
        return resident

    def start(self) -> None:
        """Start the loader thread (after `load_at_start`)."""
        self._thread = threading.Thread(target=self._run_loader, name=LOADER_THREAD, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the loader thread (a load in progress finishes first)."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _run_loader(self) -> None:
        bind_thread(self.placement.device)
        while True:
            name = self._queue.get()
            if name is None:
                return
            started = time.perf_counter()
            try:
                model: LoadedModel | None = self._load_model(name)
                error = ""
            except Exception as exc:  # reported to the model's jobs; the server goes on
                logger.exception("loading a model failed", extra={"model": name})
                model, error = None, f"{type(exc).__name__}: {exc}"[:300]
            logger.info(
                "model load finished",
                extra={
                    "model": name,
                    "ok": model is not None,
                    "seconds": round(time.perf_counter() - started, 3),
                },
            )
            with self._lock:
                self._finished.append((name, model, error))
            self.on_change()

    @staticmethod
    def _close(model: LoadedModel) -> None:
        if model.pipeline.loras is not None:
            model.pipeline.loras.close()

    def collect(self) -> None:
        """Give unloaded models' memory back (engine thread, once their pipelines are
        dropped)."""
        release_memory(self.placement.device)

    # ----- admin requests (any thread) -----

    def request_load(self, name: str, reply: AdminReply) -> None:
        """Make `name` resident; `reply` is called once it is (or cannot be)."""
        with self._lock:
            entry = self._entries[name]
            if entry.status.state is ModelState.RESIDENT:
                status = self._status_locked()
            else:
                entry.admin_loads.append(reply)
                status = None
        if status is not None:
            reply(status, (), ("", ""))
        else:
            self.on_change()

    def request_unload(self, name: str, reply: AdminReply) -> None:
        """Unload `name` once the engine thread looks; `reply` says how it went."""
        with self._lock:
            self._unloads.append((name, reply))
        self.on_change()

    def status(self) -> LibraryStatus:
        """Every configured model's status now."""
        with self._lock:
            return self._status_locked()

    def _status_locked(self) -> LibraryStatus:
        return LibraryStatus(
            device=str(self.placement.device),
            budget_bytes=self.budget,
            models=tuple(entry.status for entry in self._entries.values()),
        )

    @property
    def has_news(self) -> bool:
        """Whether a finished load, an admin load or an admin unload awaits `refresh`."""
        with self._lock:
            return bool(
                self._finished
                or self._unloads
                or any(
                    e.admin_loads and e.status.state is not ModelState.LOADING
                    for e in self._entries.values()
                )
            )

    # ----- engine thread -----

    def refresh(self, running: Collection[str], wanted: Sequence[str]) -> ResidencyChanges:
        """Apply finished loads and admin unloads, and start the next load (docstring).

        `running`: the models of the running jobs; `wanted`: the model of every waiting
        job, in admission order. A model is unloaded for another only when none of its
        jobs runs or ranks before the other's.
        """
        changes = ResidencyChanges()
        replies: list[tuple[AdminReply, tuple[str, ...], tuple[str, str]]] = []
        now = self.clock()
        with self._lock:
            for name in {*running, *wanted}:
                entry = self._entries.get(name)
                if entry is not None and entry.status.state is ModelState.RESIDENT:
                    entry.status = replace(entry.status, last_used=now)
            finished, self._finished = self._finished, []
            for name, model, error in finished:
                self._loading = None
                entry = self._entries[name]
                waiting_admins, entry.admin_loads = entry.admin_loads, []
                if model is None:
                    entry.status = replace(entry.status, state=ModelState.FAILED, error=error)
                    changes.failed[name] = (
                        f"model {name!r} could not be loaded ({error}); the next request for "
                        "it tries again"
                    )
                    outcome = ("UNAVAILABLE", changes.failed[name])
                else:
                    entry.model = model
                    entry.status = replace(
                        entry.status,
                        state=ModelState.RESIDENT,
                        memory_bytes=self.model_bytes(model),
                        loads=entry.status.loads + 1,
                        error="",
                        last_used=now,
                    )
                    changes.installed[name] = model.pipeline
                    outcome = ("", "")
                evicted, entry.evicted_for = entry.evicted_for, ()
                replies += [(reply, evicted, outcome) for reply in waiting_admins]
            unloads, self._unloads = self._unloads, []
            busy = set(running) | set(wanted)
            for name, reply in unloads:
                replies.append((reply, *self._unload_locked(name, busy, changes)))
            admin_wanted = [n for n, e in self._entries.items() if e.admin_loads]
            ahead: set[str] = set(running)
            for name in dict.fromkeys([*wanted, *admin_wanted]):
                if self._loading is not None:
                    break
                entry = self._entries[name]
                if entry.status.state in (ModelState.RESIDENT, ModelState.LOADING):
                    ahead.add(name)  # its jobs rank before this point: keep it
                    continue
                if entry.status.state is ModelState.FAILED and name in changes.failed:
                    continue  # just failed: its jobs are told; the next request retries
                need = entry.status.memory_bytes
                if not fits_alone(need, self.budget):
                    message = (
                        f"model {name!r} needs {_mib(need)}, more than the whole model memory "
                        f"budget ({_mib(self.budget)}): raise --model-memory-budget"
                    )
                    changes.failed[name] = message
                    waiting_admins, entry.admin_loads = entry.admin_loads, []
                    replies += [(r, (), ("FAILED_PRECONDITION", message)) for r in waiting_admins]
                    continue
                victims = choose_evictions(need, self.budget, self._residents_locked(), ahead)
                if victims is None:
                    changes.blocked.add(name)
                    break
                for victim in victims:
                    self._evict_locked(victim, changes)
                entry.status = replace(entry.status, state=ModelState.LOADING, error="")
                entry.evicted_for = tuple(victims)
                self._loading = name
                self._queue.put(name)
                logger.info(
                    "loading model on first use",
                    extra={"model": name, "unloaded": victims},
                )
            status = self._status_locked()
        for reply, unloaded, outcome in replies:
            reply(status, unloaded, outcome)
        return changes

    def _residents_locked(self) -> list[Resident]:
        return [
            Resident(name, e.status.memory_bytes, e.status.last_used)
            for name, e in self._entries.items()
            if e.status.state is ModelState.RESIDENT
        ]

    def _evict_locked(self, name: str, changes: ResidencyChanges) -> None:
        entry = self._entries[name]
        model, entry.model = entry.model, None
        entry.status = replace(entry.status, state=ModelState.ON_DISK)
        changes.removed.append(name)
        if model is not None:
            self._close(model)
        logger.info("model unloaded", extra={"model": name})

    def _unload_locked(
        self, name: str, busy: set[str], changes: ResidencyChanges
    ) -> tuple[tuple[str, ...], tuple[str, str]]:
        entry = self._entries[name]
        state = entry.status.state
        if state is ModelState.LOADING:
            return (), ("FAILED_PRECONDITION", f"model {name!r} is loading; unload it after")
        if state is not ModelState.RESIDENT:
            return (), ("", "")
        if name in busy:
            return (), (
                "FAILED_PRECONDITION",
                f"model {name!r} has queued or running requests; unload it when it is idle",
            )
        self._evict_locked(name, changes)
        return (name,), ("", "")
