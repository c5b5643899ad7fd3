"""Scheduler names Kiln accepts (Replicate's SDXL names) and how each is configured.

Each request gets its own scheduler instance built from the model's scheduler config, so
requests batched together keep independent state (step index, multistep history).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SchedulerChoice:
    """A diffusers scheduler class and the config overrides that define a Kiln name."""

    class_name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""


SCHEDULERS: dict[str, SchedulerChoice] = {
    "DDIM": SchedulerChoice("DDIMScheduler", description="DDIM, deterministic (eta 0)"),
    "DPMSolverMultistep": SchedulerChoice(
        "DPMSolverMultistepScheduler", description="DPM-Solver++ (2M)"
    ),
    "HeunDiscrete": SchedulerChoice(
        "HeunDiscreteScheduler", description="Heun, two UNet calls per step"
    ),
    "KarrasDPM": SchedulerChoice(
        "DPMSolverMultistepScheduler",
        {"use_karras_sigmas": True},
        description="DPM-Solver++ (2M) with Karras sigmas",
    ),
    "K_EULER_ANCESTRAL": SchedulerChoice(
        "EulerAncestralDiscreteScheduler", description="Euler ancestral (stochastic)"
    ),
    "K_EULER": SchedulerChoice("EulerDiscreteScheduler", description="Euler"),
    "PNDM": SchedulerChoice("PNDMScheduler", {"skip_prk_steps": True}, description="PNDM"),
    "UniPC": SchedulerChoice("UniPCMultistepScheduler", description="UniPC multistep"),
    "LCM": SchedulerChoice(
        "LCMScheduler", description="LCM, for latent-consistency distilled weights"
    ),
}

SchedulerFactory = Callable[[], Any]


def scheduler_names() -> list[str]:
    """Every accepted scheduler name, in a stable order."""
    return list(SCHEDULERS)


def make_scheduler(name: str, base_config: dict[str, Any]) -> Any:
    """A fresh diffusers scheduler for `name` built from a model's scheduler config.

    Raises KeyError for an unknown name (validation rejects those before this point).
    """
    import diffusers

    choice = SCHEDULERS[name]
    scheduler_class = getattr(diffusers, choice.class_name)
    return scheduler_class.from_config(base_config, **choice.overrides)
