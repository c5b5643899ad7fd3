"""What differs between the model families a request may name: their scheduler tables,
and how many denoiser rows an image takes (validation, both pipelines' batch rows and
the TensorRT profiles ask `rows_per_image`)."""

from __future__ import annotations

import math

from kiln_server.pipeline.flux_schedulers import flux_scheduler_names
from kiln_server.pipeline.schedulers import scheduler_names

FAMILIES = ("sdxl", "flux")
# A guided image's rows: the prompt's and the negative (or empty) prompt's.
GUIDED_ROWS = 2


def scheduler_names_for(family: str) -> list[str]:
    """The scheduler names a model of `family` accepts, in a stable order."""
    return flux_scheduler_names() if family == "flux" else scheduler_names()


def rows_per_image(
    family: str, *, distilled_guidance: bool, guidance_scale: float, negative_prompt: bool
) -> int:
    """Denoiser rows one image takes per step: GUIDED_ROWS under classifier-free guidance,
    else one. SDXL guides above guidance_scale 1; a FLUX model only without distilled
    guidance, with a negative prompt and above 1 (true CFG); a distilled FLUX model takes
    its guidance as an input, one row."""
    if family == "flux":
        guided = not distilled_guidance and negative_prompt and guidance_scale > 1.0
    else:
        guided = guidance_scale > 1.0
    return GUIDED_ROWS if guided else 1


def most_rows_per_image(family: str, *, distilled_guidance: bool) -> int:
    """The most rows one image of a `family` model can take: what engine profiles hold."""
    return rows_per_image(
        family, distilled_guidance=distilled_guidance, guidance_scale=math.inf, negative_prompt=True
    )
