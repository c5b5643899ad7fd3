"""What differs between the model families a request may name: their scheduler tables."""

from __future__ import annotations

from kiln_server.pipeline.flux_schedulers import flux_scheduler_names
from kiln_server.pipeline.schedulers import scheduler_names

FAMILIES = ("sdxl", "flux")


def scheduler_names_for(family: str) -> list[str]:
    """The scheduler names a model of `family` accepts, in a stable order."""
    return flux_scheduler_names() if family == "flux" else scheduler_names()
