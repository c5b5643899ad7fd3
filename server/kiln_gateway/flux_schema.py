"""The input schemas of Replicate's `black-forest-labs/flux-schnell` and `flux-dev`, for the
Kiln models whose ListModels `family` is "flux".

The schema is chosen by the served model, never by the name a script calls it by, so an
alias `black-forest-labs/flux-schnell=flux-schnell` serves Replicate's schnell inputs because
the Kiln model is a FLUX model. Which of the two schemas a model gets:
- schnell-like: a model without distilled guidance (ListModels' `distilled_guidance` false,
  as FLUX.1-schnell). It takes no `guidance` and no `image`, as on Replicate;
  `num_inference_steps` is capped at 4 (Replicate's flux-schnell range, or the model's own
  maximum if lower);
- dev-like: a model with distilled guidance. `guidance` (Replicate's 0-10, capped at the
  model's `max_guidance_scale`) becomes Kiln's `guidance_scale`, the distilled guidance; `image`
  and `prompt_strength` are passed on for image-to-image, and where the Kiln server does
  not serve FLUX image inputs its refusal comes back as a 422 naming `input.image`.

Sizes: Replicate picks the size from `aspect_ratio` (11 presets, "1:1" default) and
`megapixels` ("1" default, or "0.25" which halves each side). Its preset sizes are for
1024x1024 models; for a Kiln model each side is multiplied by
`sqrt(default_width * default_height) / 1024` (so "1:1" at "1" is the model's default area),
rounded to the nearest multiple of the model's size multiple (16 for FLUX), and clamped to
the model's min/max size. A 64x64 model thus gives 64x64 for "1:1", 80x48 for "16:9",
and 32x32 for "1:1" at "0.25".

Defaults: `num_inference_steps` and `guidance` default to the Kiln model's own defaults
(the server resolves them; for FLUX.1 models these are Replicate's 4 and 28 steps);
every other default is Replicate's: `output_format` webp, `output_quality` 80 (Replicate's
0 is sent as Kiln's lowest quality, 1), `num_outputs` 1. `go_fast` (Replicate's fp8
quantisation) and `disable_safety_checker` are accepted as no-ops noted in the logs.
Inputs neither schema has are dropped and noted in the logs, as for SDXL.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_gateway.schema import InputField

__all__ = [
    "ASPECT_RATIOS",
    "FLUX_FAMILY",
    "MEGAPIXELS",
    "SCHNELL_MAX_STEPS",
    "flux_input_fields",
    "flux_request_values",
    "flux_size",
    "is_schnell_like",
]

FLUX_FAMILY = "flux"
"""The ListModels `family` of the models this schema serves."""
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "21:9": (1536, 640),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "4:5": (896, 1088),
    "5:4": (1088, 896),
    "3:4": (896, 1152),
    "4:3": (1152, 896),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}
"""Replicate's (cog-flux's) width and height per aspect ratio at megapixels "1"."""
MEGAPIXELS: dict[str, float] = {"1": 1.0, "0.25": 0.5}
"""Replicate's megapixels choices and the factor each applies to both sides."""
SCHNELL_MAX_STEPS = 4
"""Replicate's flux-schnell step limit (schnell-like models are capped at it)."""
REPLICATE_SIZE = 1024
"""The side of Replicate's "1:1" preset, the model size its presets are written for."""
REPLICATE_MAX_OUTPUTS = 4
DEV_MAX_GUIDANCE = 10.0
DEV_MAX_STEPS = 50
OUTPUT_FORMATS = ("webp", "jpg", "png")
FLUX_LORA_REFUSAL = (
    "the Kiln server applies no LoRAs to FLUX models yet; leave it out or use an SDXL model"
)
_FLUX_ONLY = ("aspect_ratio", "megapixels", "guidance", "go_fast")


def is_schnell_like(info: pb.ModelInfo) -> bool:
    """Whether the model gets flux-schnell's schema: it has no distilled guidance
    (ListModels' `distilled_guidance`), so Replicate's `guidance` has nothing to drive."""
    return not info.distilled_guidance


def flux_size(info: pb.ModelInfo, aspect_ratio: str, megapixels: str) -> tuple[int, int]:
    """The (width, height) a preset gives on this model (see the module docstring).

    Raises:
        KeyError: an aspect ratio or megapixels value that is not one of Replicate's.
    """
    width, height = ASPECT_RATIOS[aspect_ratio]
    default_w = info.default_width or REPLICATE_SIZE
    default_h = info.default_height or REPLICATE_SIZE
    scale = math.sqrt(default_w * default_h) / REPLICATE_SIZE * MEGAPIXELS[megapixels]
    step = info.size_multiple or 16
    low = math.ceil((info.min_size or step) / step) * step
    high = max(low, (info.max_size or 2048) // step * step)

    def side(pixels: int) -> int:
        nearest = math.floor(pixels * scale / step + 0.5) * step  # half up, not half even
        return min(max(nearest, low), high)

    return side(width), side(height)


def flux_input_fields(info: pb.ModelInfo, shared: list[InputField]) -> list[InputField]:
    """Every input of Replicate's flux-schnell or flux-dev schema (see `is_schnell_like`)
    with this Kiln model's limits, in Replicate's order, then Kiln's own inputs.

    `shared` is the SDXL table (`kiln_gateway.schema`), whose `prompt`, `seed`,
    `prompt_strength`, `disable_safety_checker`, `loras`, `priority` and `output_as_data_uri`
    mean the same here and are reused with FLUX's defaults. The FLUX-style LoRA inputs
    `lora_weights` and `extra_lora` answer 422 (never silently dropped, and no URL is
    fetched) while the server applies no LoRAs to FLUX models; Kiln's `loras` goes to the
    server, which names the refusal.
    """
    base = {spec.name: spec for spec in shared}
    schnell = is_schnell_like(info)
    model_max_steps = info.max_num_inference_steps or DEV_MAX_STEPS
    max_steps = min(SCHNELL_MAX_STEPS, model_max_steps) if schnell else model_max_steps
    max_guidance = min(DEV_MAX_GUIDANCE, info.max_guidance_scale or DEV_MAX_GUIDANCE)
    fields = [
        replace(
            base["prompt"], description="Prompt for generated image", default=None, required=True
        ),
    ]
    if not schnell:
        fields += [
            replace(
                base["image"],
                description="Input image for image to image mode (a data URI, a file from "
                "POST /v1/files or an http(s) URL). The aspect ratio of your output will "
                "match this image; refused with a 422 while the Kiln server serves no FLUX "
                "image inputs",
            ),
            replace(
                base["prompt_strength"],
                description="Prompt strength when using img2img. 1.0 corresponds to full "
                "destruction of information in image",
            ),
        ]
    fields += [
        InputField(
            "aspect_ratio",
            "string",
            "Aspect ratio for the generated image; Replicate's sizes scaled to this model's "
            f"default area ({info.default_width}x{info.default_height} for 1:1), multiples "
            f"of {info.size_multiple or 16}",
            default="1:1",
            choices=tuple(ASPECT_RATIOS),
        ),
        InputField(
            "megapixels",
            "string",
            'Approximate size: "1" is the model\'s default area, "0.25" halves each side',
            default="1",
            choices=tuple(MEGAPIXELS),
        ),
        replace(
            base["num_outputs"],
            description="Number of outputs to generate; image i uses seed + i",
            maximum=min(REPLICATE_MAX_OUTPUTS, info.max_num_outputs or REPLICATE_MAX_OUTPUTS),
        ),
        InputField(
            "num_inference_steps",
            "integer",
            "Number of denoising steps"
            + (". 4 is recommended, and lower number of steps produce lower quality outputs"
               if schnell else ". Recommended range is 28-50"),
            default=info.default_num_inference_steps or None,
            minimum=1,
            maximum=max_steps,
        ),
    ]  # fmt: skip
    if not schnell:
        fields.append(
            InputField(
                "guidance",
                "number",
                "Guidance for generated image (Kiln's guidance_scale: distilled guidance on a "
                "model with a guidance embedding, classifier-free guidance otherwise)",
                default=_number(info.default_guidance_scale) or None,
                minimum=0,
                maximum=_number(max_guidance),
            )
        )
    fields += [
        base["seed"],
        InputField(
            "output_format",
            "string",
            "Format of the output images",
            default="webp",
            choices=OUTPUT_FORMATS,
        ),
        InputField(
            "output_quality",
            "integer",
            "Quality when saving the output images, from 0 to 100 (100 is best; not "
            "relevant for .png outputs; 0 is encoded as 1, Kiln's lowest)",
            default=80,
            minimum=0,
            maximum=100,
        ),
        base["disable_safety_checker"],
        InputField(
            "go_fast",
            "boolean",
            "Accepted for compatibility; Kiln runs the model as served (Replicate's fp8 "
            "quantisation does not apply)",
            role="noop",
            default=True,
        ),
        *(
            replace(base[name], role="unsupported", unsupported_reason=FLUX_LORA_REFUSAL)
            for name in ("lora_weights", "extra_lora")
        ),
        base["loras"],
        base["priority"],
        base["output_as_data_uri"],
    ]
    return fields


def flux_request_values(values: dict[str, Any], info: pb.ModelInfo) -> dict[str, Any]:
    """The checked FLUX input as the SDXL names `kiln_gateway.schema` builds a request from:
    `width`/`height` from the presets (none with an image: the output takes its size),
    `guidance_scale` from `guidance`, Replicate's output defaults filled in."""
    translated = {name: value for name, value in values.items() if name not in _FLUX_ONLY}
    translated |= {
        "output_format": values.get("output_format", "webp"),
        "output_quality": max(1, values.get("output_quality", 80)),
    }
    if "image" not in values:  # with an image, the output takes its size (as on Replicate)
        aspect_ratio, megapixels = values.get("aspect_ratio", "1:1"), values.get("megapixels", "1")
        translated["width"], translated["height"] = flux_size(info, aspect_ratio, megapixels)
    if "guidance" in values:
        translated["guidance_scale"] = values["guidance"]
    return translated


def _number(value: float) -> float | int:
    rounded = round(value, 4)
    return int(rounded) if float(rounded).is_integer() else rounded
