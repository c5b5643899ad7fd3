"""One served model's LoRAs: files read off the engine thread, adapters resident in a stack.

Flow. Between steps the engine thread calls `refresh` with the LoRA names of the running
jobs and of the waiting jobs in admission order. It
1. installs the adapters the loader thread has read into the stack: slot writes happen only
   here, on the engine thread, so no running UNet call sees a half-written slot, and they
   never evict an adapter a running job uses;
2. queues reads for what the waiting jobs need, job by job in admission order while their
   adapters fit in the stack beside the running jobs' (so the first waiting job always gets
   its own, and jobs never pin each other's halves), one read per name at a time;
3. returns the names whose file could not be used, with the error, once each.

The loader thread resolves the name in the folders, reads the file (`read_lora_file`, the
slow part) and checks it against the stack, then calls `on_read` (the batcher's wake-up).
Read weights wait only until installed, or are dropped when no waiting job wants them any
more, so beside the stack at most `capacity` files are held: memory does not grow with the
number of distinct LoRAs served.

A file's text-encoder weights travel with it: one file is one adapter, resident in one slot
of the stack for the UNet and the text encoders alike (`text_encoder_loras` gives a request's
text-encoder part to the prompt encoder). On a stack without text-encoder layers such a
file is refused (the request fails with INVALID_ARGUMENT naming it) rather than served with
its UNet part only.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

from kiln_server.lora.errors import LoraError, LoraRefused, StackFull
from kiln_server.lora.folders import LORA_SUFFIX, LoraFolders
from kiln_server.lora.reading import read_lora_file
from kiln_server.lora.stack import AdapterStack, TextEncoderLoras
from kiln_server.lora.weights import LoraWeights
from kiln_server.pipeline.params import LoraUse

logger = logging.getLogger(__name__)

LOADER_THREAD = "kiln-lora-loader"


class LoraLibrary:
    """The LoRAs one model serves: its folders, its adapter stack and a loader thread.

    `refresh`, `ensure_resident`, `assign` and `text_encoder_loras` belong to the engine
    thread (the stack's owner); `uses` and `is_resident` may be called from any thread.
    """

    def __init__(
        self,
        folders: LoraFolders,
        stack: AdapterStack,
        *,
        unet_config: Any = None,
        on_read: Callable[[], None] | None = None,
    ) -> None:
        self.folders = folders
        self.stack = stack
        self.unet_config = unet_config
        # Called on the loader thread after each file is read (or fails).
        self.on_read = on_read
        self._lock = threading.Lock()
        self._reading: set[str] = set()
        self._ready: dict[str, LoraWeights] = {}
        self._failed: dict[str, LoraError] = {}
        self._resident: frozenset[str] = frozenset()
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    @property
    def capacity(self) -> int:
        """Adapters the stack holds at once."""
        return self.stack.capacity

    def uses(self, loras: Iterable[LoraUse]) -> tuple[LoraUse, ...]:
        """The uses that apply (scale 0 is off: never loaded), named by file name without
        the suffix, so `style` and `style.safetensors` are one adapter.

        Raises `LoraNotFound` for a name that is not a plain file name.
        """
        return tuple(
            LoraUse(self.folders.file_name(use.name).removesuffix(LORA_SUFFIX), use.scale)
            for use in loras
            if use.scale != 0.0
        )

    def is_resident(self, names: Collection[str]) -> bool:
        """Whether every named adapter is in the stack now."""
        with self._lock:
            return self._resident.issuperset(names)

    def refresh(
        self, running: Collection[str], waiting: Sequence[Collection[str]]
    ) -> dict[str, LoraError]:
        """Install what was read, queue reads for what the waiting jobs need, and return the
        names that failed since the last call (engine thread; see the module docstring)."""
        pinned = set(running)
        for names in waiting:
            if len(pinned | set(names)) > self.capacity:
                break  # later jobs wait until this one's adapters fit
            pinned.update(names)
        with self._lock:
            ready, self._ready = self._ready, {}
            failed, self._failed = self._failed, {}
        if ready:
            # Between steps nothing runs: the running jobs' adapters are `pinned`, and the
            # last step's assignment must not pin adapters of jobs that have finished.
            self.stack.clear()
        for name, weights in ready.items():
            if name not in pinned or self.stack.slot_of(name) is not None:
                continue  # no longer wanted (its jobs were cancelled) or already there
            try:
                self.stack.load(weights, in_use=pinned)
            except StackFull:
                with self._lock:  # the running batch holds every slot: try again later
                    self._ready[name] = weights
            except LoraRefused as error:
                failed[name] = error
        resident = frozenset(self.stack.resident)
        with self._lock:
            self._resident = resident
            wanted = pinned - resident - self._reading - set(self._ready) - set(failed)
            self._reading.update(wanted)
        for name in sorted(wanted):
            self._start()
            self._queue.put(name)
        return failed

    def ensure_resident(self, uses: Sequence[LoraUse]) -> None:
        """Make the adapters of one request resident now, reading any missing file on the
        calling thread (engine thread; the batcher's `refresh` has done it off the thread
        before a job is admitted, so only direct pipeline callers pay the read here).

        Raises the `LoraError` of a file that cannot be used.
        """
        names = {use.name for use in uses}
        for name in sorted(names):
            if self.stack.slot_of(name) is None:
                self.stack.load(self._read(name), in_use=names)
        with self._lock:
            self._resident = frozenset(self.stack.resident)

    def assign(self, rows: Sequence[Sequence[LoraUse]]) -> None:
        """Set the adapters of each row of the next UNet call (engine thread)."""
        if any(rows):
            self.stack.assign(rows)
        else:
            self.stack.clear()

    def text_encoder_loras(self, uses: Sequence[LoraUse]) -> TextEncoderLoras | None:
        """The text-encoder part of one request's LoRAs (resident: after `ensure_resident`),
        or None when none has text-encoder weights (engine thread)."""
        return self.stack.text_encoder_loras(uses)

    def close(self) -> None:
        """Stop the loader thread once its current read ends."""
        self._queue.put(None)

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._load, name=LOADER_THREAD, daemon=True)
            self._thread.start()

    def _read(self, name: str) -> LoraWeights:
        """Resolve, read and check one file; every failure is a `LoraError` naming it."""
        try:
            path = self.folders.resolve(name)
            weights = read_lora_file(
                path,
                max_rank=self.stack.max_rank,
                name=name,
                unet_config=self.unet_config,
            )
            self.stack.check(weights)  # layer shapes only: safe off the engine thread
        except LoraError:
            raise
        except Exception as error:  # whatever the file does to the reader, it is the file's
            logger.debug("reading a LoRA failed", exc_info=error)
            raise LoraRefused(
                name, f"it could not be read ({type(error).__name__}: {str(error)[:160]})"
            ) from None
        return weights

    def _load(self) -> None:
        while (name := self._queue.get()) is not None:
            try:
                weights: LoraWeights | None = self._read(name)
                error: LoraError | None = None
            except LoraError as refused:
                weights, error = None, refused
            with self._lock:
                self._reading.discard(name)
                if weights is not None:
                    self._ready[name] = weights
                elif error is not None:
                    self._failed[name] = error
            logger.info(
                "LoRA read" if error is None else "LoRA refused",
                extra={"lora": name, **({"why": error.reason} if error else {})},
            )
            if self.on_read is not None:
                self.on_read()
