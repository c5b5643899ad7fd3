"""Scheduler names Kiln accepts for FLUX-family models and how each request's schedule is set.

Flow-matching models need flow-matching schedulers, so FLUX has its own table beside the
SDXL one (pipeline/schedulers.py). Each request gets its own scheduler instance, set up as
diffusers' FluxPipeline sets it: sigmas linspace(1, 1/steps, steps), shifted statically
by the config's `shift`, or, when the config has `use_dynamic_shifting`, by
`mu = calculate_shift(image tokens, ...)` computed from the request's own image size.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kiln_server.pipeline.schedulers import SchedulerChoice

FLOW_MATCH_EULER = "FLOW_MATCH_EULER"

FLUX_SCHEDULERS: dict[str, SchedulerChoice] = {
    FLOW_MATCH_EULER: SchedulerChoice(
        "FlowMatchEulerDiscreteScheduler", description="Euler for flow matching (FLUX's own)"
    ),
}


def flux_scheduler_names() -> list[str]:
    """Every scheduler name a FLUX-family model accepts, in a stable order."""
    return list(FLUX_SCHEDULERS)


def flux_sigmas(steps: int) -> np.ndarray:
    """The unshifted sigmas of a `steps`-step schedule, as diffusers' FluxPipeline builds
    them (float64; the scheduler shifts and casts them)."""
    return np.linspace(1.0, 1 / steps, steps)


def image_shift(config: dict[str, Any], image_tokens: int) -> float:
    """`mu` of an image of `image_tokens` transformer tokens: diffusers' `calculate_shift`
    over the scheduler config's values, with FluxPipeline's defaults for missing keys."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return float(
        calculate_shift(
            image_tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
    )


def make_flux_scheduler(
    name: str,
    config: dict[str, Any],
    steps: int,
    image_tokens: int,
    device: torch.device | None = None,
) -> Any:
    """A fresh scheduler for `name` over a model's scheduler config, its timesteps set for
    `steps` steps of an image of `image_tokens` tokens and its first step index 0.

    ValueError names the accepted schedulers for an unknown `name`, and the step count for
    one below 1.
    """
    import diffusers

    choice = FLUX_SCHEDULERS.get(name)
    if choice is None:
        raise ValueError(
            f"scheduler {name!r} is not served for FLUX models; use one of "
            f"{', '.join(flux_scheduler_names())}"
        )
    if steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {steps}")
    scheduler_class = getattr(diffusers, choice.class_name)
    scheduler = scheduler_class.from_config(config, **choice.overrides)
    # mu is always passed, as FluxPipeline does; the scheduler reads it only under
    # use_dynamic_shifting.
    scheduler.set_timesteps(
        sigmas=flux_sigmas(steps), mu=image_shift(config, image_tokens), device=device
    )
    scheduler.set_begin_index(0)
    return scheduler
