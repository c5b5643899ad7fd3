"""Where each configured model is: the record the engine core reports and the admin API
shows."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ModelState(StrEnum):
    """A configured model's place in the library."""

    ON_DISK = "on_disk"  # not in memory; the first request for it loads it
    LOADING = "loading"  # being read and warmed up; its requests wait queued
    RESIDENT = "resident"  # in memory and serving
    FAILED = "failed"  # its last load failed; the next request for it tries again


@dataclass(frozen=True)
class ModelStatus:
    """One model's state, the device bytes it holds (while resident; else the bytes it held
    when last loaded, 0 if never), how many loads it has had, and why its last load failed.
    `last_used` is the engine core's monotonic time of its last request activity."""

    name: str
    state: ModelState
    memory_bytes: int = 0
    loads: int = 0
    error: str = ""
    last_used: float = 0.0


@dataclass(frozen=True)
class LibraryStatus:
    """Every configured model's status, the device and the budget (0: none)."""

    device: str
    budget_bytes: int
    models: tuple[ModelStatus, ...]

    @property
    def used_bytes(self) -> int:
        """Bytes the resident models hold together."""
        return sum(m.memory_bytes for m in self.models if m.state is ModelState.RESIDENT)

    def get(self, name: str) -> ModelStatus | None:
        """The status of model `name`, or None when it is not configured."""
        return next((m for m in self.models if m.name == name), None)
