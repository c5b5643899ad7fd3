"""The input schema of Replicate's `stability-ai/sdxl`, checked and turned into a GenerateRequest.

One table (`input_fields`) declares every input: it drives validation, the OpenAPI
`openapi_schema` each model version reports, and the translation to Kiln's request. Its
limits and defaults come from the Kiln model itself (`ModelInfo` from ListModels), so a
script sees the same numbers the server enforces. A model of family "flux" gets Replicate's
FLUX schemas instead (`kiln_gateway.flux_schema`), checked here the same way and translated
to this module's names before the request is built.

Fields fall in five groups:
- generation: `prompt`, `negative_prompt`, `width`, `height`, `num_outputs`, `scheduler`
  (Replicate's names), `num_inference_steps`, `guidance_scale`, `seed`; and image
  conditioning: `image` (img2img; with `mask`, inpainting), `mask` (white repaints, black
  keeps) and `prompt_strength` (Kiln's `strength`, only sent with an image);
- LoRAs: Replicate SDXL's `replicate_weights` at `lora_scale` (default 0.6), and the
  FLUX-style `lora_weights` at `lora_scale` (default 1) and `extra_lora` at
  `extra_lora_scale` (default 1), for SDXL models (the FLUX schema refuses the LoRA inputs
  while the server applies no LoRAs to FLUX models). Each is the name of a LoRA the model
  lists (ModelInfo.loras), or a URL (http(s), or a file uploaded with POST /v1/files) of a
  .safetensors file or of a .tar holding one: `ParsedInput.lora_urls` lists those for
  `kiln_gateway.loras` to import into the Kiln server's LoRA cache, and
  `ParsedInput.attach_loras` adds the names it gets back;
- not available yet, answered with a validation error naming the field: `refine` other
  than `no_refiner`;
- accepted and documented as no-ops: `high_noise_frac`, `refine_steps` (they only act with
  a refiner), `apply_watermark` (Kiln never watermarks), `disable_safety_checker` (Kiln
  runs no safety checker); `lora_scale` without `replicate_weights` or `lora_weights`, and
  `extra_lora_scale` without `extra_lora`, are noted as no effect;
- Kiln's own: `loras` (a list of `{"name", "scale"}`, Kiln's `GenerateRequest.loras`),
  `output_format` (png, jpg, webp), `output_quality`, `priority` (low, normal, high),
  `output_as_data_uri` (return data URIs instead of file URLs), and for inpainting
  `keep_unmasked` (black mask pixels keep the photo's exact pixels; default true) and
  `mask_crop_padding` (generate only around the mask, for small products in large photos).

`image` and `mask` are checked here only as strings; `ParsedInput.images` lists them for
`kiln_gateway.inputs` to turn into bytes (data URIs, uploaded files, fetched URLs), which
`ParsedInput.attach` then puts into the request.

Errors use Replicate's words: `Invalid type. Expected: integer, given: string`,
`Must be less than or equal to 4`, `scheduler must be one of the following: ...`.
Unknown input names are ignored rather than rejected: they are dropped from the stored
input and noted (names cut short) in the prediction's logs, so an input written for a
slightly different model version still runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.requests import build_request
from kiln_gateway.errors import InvalidField, shorten

__all__ = [
    "DEFAULT_PROMPT",
    "LORA_URL_INPUTS",
    "InputField",
    "InputInvalid",
    "LoraUrl",
    "ParsedInput",
    "input_fields",
    "openapi_schema",
    "parse_input",
    "replicate_field",
    "violations_to_fields",
]

Kind = Literal["string", "integer", "number", "boolean", "array"]
Role = Literal["generate", "unsupported", "noop", "kiln"]

DEFAULT_PROMPT = "An astronaut riding a rainbow unicorn"
"""Replicate's SDXL default prompt, used when the input has none (as on Replicate)."""

MAX_SEED = 2**64 - 1
MAX_UINT32 = 2**32 - 1
DEFAULT_STRENGTH = 0.8
"""Replicate's `prompt_strength` default, for a Kiln model that reports none."""
IMAGE_INPUTS = ("image", "mask")
OUTPUT_FORMATS = ("png", "jpg", "webp")
PRIORITIES = ("low", "normal", "high")
REFINERS = ("no_refiner", "expert_ensemble_refiner", "base_image_refiner")
REPLICATE_LORA_SCALE = 0.6
"""Replicate's SDXL `lora_scale` default, applied to `replicate_weights`."""
FLUX_LORA_SCALE = 1.0
"""The FLUX-style default of `lora_scale` (with `lora_weights`) and `extra_lora_scale`."""
MAX_LORA_SCALE = 4.0
"""The largest |scale| Kiln takes for a LoRA (GenerateRequest.loras)."""
LORA_URL_INPUTS = ("replicate_weights", "lora_weights", "extra_lora")
"""The inputs that take a LoRA name or the URL of a LoRA file."""
_NULLABLE_LORA_INPUTS = (*LORA_URL_INPUTS, "loras")
_MAX_LORAS_GIVEN = 64
"""Most `loras` entries parsed here; the server's own limit is lower."""


def _lora_names(info: pb.ModelInfo) -> str:
    names = [lora.name for lora in info.loras]
    if not names:
        return "; this model has no LoRAs"
    shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    return f"; this model's LoRAs: {shown}"


@dataclass(frozen=True)
class InputField:
    """One input as the version's OpenAPI schema declares it and the gateway checks it."""

    name: str
    kind: Kind
    description: str
    role: Role = "generate"
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    format: str | None = None
    nullable: bool = False
    unsupported_reason: str = ""
    items: dict[str, Any] | None = None
    required: bool = False
    """The input must be given (Replicate's FLUX `prompt`); listed in the schema's `required`."""

    def schema(self, order: int) -> dict[str, Any]:
        """This field as a JSON-schema property (with Cog's `x-order`)."""
        prop: dict[str, Any] = {
            "type": self.kind,
            "title": self.name.replace("_", " ").title(),
            "description": self.description,
            "x-order": order,
        }
        if self.default is not None:
            prop["default"] = self.default
        if self.minimum is not None:
            prop["minimum"] = self.minimum
        if self.maximum is not None:
            prop["maximum"] = self.maximum
        if self.choices is not None:
            prop["enum"] = list(self.choices)
        if self.format is not None:
            prop["format"] = self.format
        if self.items is not None:
            prop["items"] = self.items
        return prop


class InputInvalid(ValueError):
    """The input breaks the schema; `fields` lists every problem (field names `input.x`)."""

    def __init__(self, fields: list[InvalidField]) -> None:
        super().__init__("; ".join(f"{f.field}: {f.description}" for f in fields))
        self.fields = fields


@dataclass(frozen=True)
class LoraUrl:
    """A LoRA input given as a URL: the input's name, the URL, and the scale to apply."""

    field: str
    url: str
    scale: float


@dataclass
class ParsedInput:
    """A valid input: the request for Kiln, how to return outputs, and notes for the logs."""

    request: pb.GenerateRequest
    data_uri: bool = False
    notes: list[str] = field(default_factory=list)
    images: dict[str, str] = field(default_factory=dict)
    """The `image` / `mask` inputs given (name to data URI or URL), still to be resolved."""
    known: dict[str, Any] = field(default_factory=dict)
    """The input as given, without the fields the schema does not have (what is stored)."""
    lora_urls: list[LoraUrl] = field(default_factory=list)
    """The LoRA inputs given as URLs, still to be imported into the Kiln server."""

    def attach_loras(self, names: dict[str, str]) -> None:
        """Add the LoRAs the URLs became (input name -> LoRA name) at their scales."""
        for lora in self.lora_urls:
            self.request.loras.add(name=names[lora.field], scale=lora.scale)

    def attach(self, resolved: dict[str, bytes]) -> None:
        """Put the resolved image bytes (by input name) into the request."""
        if "image" in resolved:
            self.request.image = resolved["image"]
        if "mask" in resolved:
            self.request.mask = resolved["mask"]


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def input_fields(info: pb.ModelInfo) -> list[InputField]:
    """Every input of the model's schema with its defaults and limits, in order: Replicate's
    FLUX schemas (`kiln_gateway.flux_schema`) for a model of ListModels family "flux",
    else the SDXL one."""
    if info.family == "flux":
        # flux_schema builds on this module's InputField and SDXL fields: imported here.
        from kiln_gateway.flux_schema import flux_input_fields

        return flux_input_fields(info, _sdxl_input_fields(info))
    return _sdxl_input_fields(info)


def _sdxl_input_fields(info: pb.ModelInfo) -> list[InputField]:
    steps_max = info.max_num_inference_steps or 500
    size_min, size_max = info.min_size or 64, info.max_size or 2048
    schedulers = tuple(info.schedulers) or None
    image_limits = _image_limits(info)
    return [
        InputField("prompt", "string", "Input prompt", default=DEFAULT_PROMPT),
        InputField("negative_prompt", "string", "Input Negative Prompt", default=""),
        InputField(
            "image",
            "string",
            "Input image for img2img or inpaint mode: a data URI, a file uploaded with "
            "POST /v1/files, or an http(s) URL; PNG, JPEG or WebP"
            f"{image_limits}. Without width and height the output has its size",
            format="uri",
        ),
        InputField(
            "mask",
            "string",
            "Input mask for inpaint mode. Black areas will be preserved, white areas will be "
            "inpainted (grey blends); same sources and formats as image, resized to it",
            format="uri",
        ),
        InputField(
            "width",
            "integer",
            f"Width of output image (a multiple of 8, {size_min}-{size_max})",
            default=info.default_width or None,
            minimum=size_min,
            maximum=size_max,
        ),
        InputField(
            "height",
            "integer",
            f"Height of output image (a multiple of 8, {size_min}-{size_max})",
            default=info.default_height or None,
            minimum=size_min,
            maximum=size_max,
        ),
        InputField(
            "num_outputs",
            "integer",
            "Number of images to output; image i uses seed + i",
            default=1,
            minimum=1,
            maximum=info.max_num_outputs or 4,
        ),
        InputField(
            "scheduler",
            "string",
            "scheduler",
            default=info.default_scheduler or None,
            choices=schedulers,
        ),
        InputField(
            "num_inference_steps",
            "integer",
            "Number of denoising steps",
            default=info.default_num_inference_steps or None,
            minimum=1,
            maximum=steps_max,
        ),
        InputField(
            "guidance_scale",
            "number",
            "Scale for classifier-free guidance",
            default=_number(round(info.default_guidance_scale, 4)) or None,
            minimum=0,
            maximum=_number(round(info.max_guidance_scale, 4)) or 50,
        ),
        InputField(
            "prompt_strength",
            "number",
            "Prompt strength when using img2img / inpaint. 1.0 corresponds to full "
            "destruction of information in image (no effect without an image)",
            default=_number(round(info.default_strength, 4)) or DEFAULT_STRENGTH,
            minimum=0,
            maximum=1,
        ),
        InputField(
            "seed",
            "integer",
            "Random seed. Leave blank to randomize the seed",
            minimum=0,
            maximum=MAX_SEED,
        ),
        InputField(
            "refine",
            "string",
            "Which refine style to use (Kiln has no refiner yet: only no_refiner)",
            default="no_refiner",
            choices=REFINERS,
            unsupported_reason="Kiln has no refiner yet; use no_refiner or leave refine out",
        ),
        InputField(
            "high_noise_frac",
            "number",
            "For expert_ensemble_refiner, the fraction of noise to use (no effect in Kiln)",
            role="noop",
            default=0.8,
            minimum=0,
            maximum=1,
        ),
        InputField(
            "refine_steps",
            "integer",
            "For base_image_refiner, the number of steps to refine (no effect in Kiln)",
            role="noop",
            minimum=1,
        ),
        InputField(
            "apply_watermark",
            "boolean",
            "Accepted for compatibility; Kiln never watermarks its images",
            role="noop",
            default=True,
        ),
        InputField(
            "lora_scale",
            "number",
            f"LoRA additive scale. Only applicable with replicate_weights (default "
            f"{REPLICATE_LORA_SCALE:g}) or lora_weights (default {FLUX_LORA_SCALE:g})",
            default=REPLICATE_LORA_SCALE,
            minimum=-MAX_LORA_SCALE,
            maximum=MAX_LORA_SCALE,
        ),
        InputField(
            "replicate_weights",
            "string",
            "LoRA weights: the name of a LoRA this model lists, or the URL (http(s), or a file "
            "from POST /v1/files) of a .safetensors LoRA or of a .tar holding exactly one; "
            "the Kiln server imports each URL once" + _lora_names(info),
        ),
        InputField(
            "lora_weights",
            "string",
            "FLUX-style LoRA weights, applied at lora_scale (default "
            f"{FLUX_LORA_SCALE:g}): a LoRA name or URL as for replicate_weights (give one of "
            "the two)",
        ),
        InputField(
            "extra_lora",
            "string",
            "FLUX-style second LoRA, applied at extra_lora_scale: a LoRA name or URL as for "
            "replicate_weights",
        ),
        InputField(
            "extra_lora_scale",
            "number",
            "Scale of extra_lora",
            default=FLUX_LORA_SCALE,
            minimum=-MAX_LORA_SCALE,
            maximum=MAX_LORA_SCALE,
        ),
        InputField(
            "disable_safety_checker",
            "boolean",
            "Accepted for compatibility; Kiln runs no safety checker",
            role="noop",
            default=False,
        ),
        InputField(
            "output_format",
            "string",
            "Kiln: encoding of the output images",
            role="kiln",
            default="png",
            choices=OUTPUT_FORMATS,
        ),
        InputField(
            "output_quality",
            "integer",
            "Kiln: JPEG/WebP quality (ignored for PNG)",
            role="kiln",
            default=90,
            minimum=1,
            maximum=100,
        ),
        InputField(
            "priority",
            "string",
            "Kiln: admission priority into the running batch",
            role="kiln",
            default="normal",
            choices=PRIORITIES,
        ),
        InputField(
            "output_as_data_uri",
            "boolean",
            "Kiln: return outputs as data URIs instead of file URLs",
            role="kiln",
            default=False,
        ),
        InputField(
            "keep_unmasked",
            "boolean",
            "Kiln: with a mask, keep the photo's exact pixels where the mask is black (grey "
            "mask values blend in proportion)",
            role="kiln",
            default=True,
        ),
        InputField(
            "loras",
            "array",
            'Kiln: LoRAs to apply, each {"name": a LoRA this model lists, "scale": '
            f"-{MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}, default 1, 0 = off}}; at most "
            f"{info.max_loras_per_request or 'a few'}" + _lora_names(info),
            role="kiln",
            items={
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "scale": {
                        "type": "number",
                        "default": 1.0,
                        "minimum": -MAX_LORA_SCALE,
                        "maximum": MAX_LORA_SCALE,
                    },
                },
                "required": ["name"],
            },
        ),
        InputField(
            "mask_crop_padding",
            "integer",
            "Kiln: with a mask, generate only in the mask's bounding box grown by this many "
            "pixels, then paste it back into the full photo (for small products in large "
            "photos); absent means no crop",
            role="kiln",
            minimum=0,
            maximum=MAX_UINT32,
        ),
    ]


def _image_limits(info: pb.ModelInfo) -> str:
    limits = []
    if info.max_image_bytes:
        limits.append(f"{info.max_image_bytes} bytes")
    if info.max_image_pixels:
        limits.append(f"{info.max_image_pixels} pixels")
    return f", at most {' and '.join(limits)}" if limits else ""


def openapi_schema(info: pb.ModelInfo) -> dict[str, Any]:
    """The OpenAPI document a model version reports (Cog's layout: Input and Output schemas)."""
    fields = input_fields(info)
    required = [f.name for f in fields if f.required]
    return {
        "openapi": "3.0.2",
        "info": {"title": "Kiln", "version": "0.1.0"},
        "paths": {},
        "components": {
            "schemas": {
                "Input": {
                    "type": "object",
                    "title": "Input",
                    "properties": {f.name: f.schema(i) for i, f in enumerate(fields)},
                    **({"required": required} if required else {}),
                },
                "Output": {
                    "type": "array",
                    "title": "Output",
                    "items": {"type": "string", "format": "uri"},
                },
            }
        },
    }


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _typed(spec: InputField, value: Any) -> tuple[Any, InvalidField | None]:
    """The value coerced to the field's kind, or an invalid_type problem."""
    given = _json_type(value)
    ok = (
        (spec.kind == "string" and given == "string")
        or (spec.kind == "boolean" and given == "boolean")
        or (spec.kind == "integer" and given == "integer")
        or (spec.kind == "number" and given in ("integer", "number"))
        or (spec.kind == "array" and given == "array")
    )
    if ok and spec.kind in ("integer", "number") and not math.isfinite(float(value)):
        ok = False
    if not ok:
        return None, InvalidField(
            type="invalid_type",
            field=f"input.{spec.name}",
            description=f"Invalid type. Expected: {spec.kind}, given: {given}",
        )
    if spec.kind == "integer":
        return int(value), None
    if spec.kind == "number":
        return float(value), None
    if spec.kind == "array":
        return list(value), None
    return value, None


def _checked(spec: InputField, value: Any) -> InvalidField | None:
    where = f"input.{spec.name}"
    if spec.minimum is not None and value < spec.minimum:
        return InvalidField(
            type="number_gte",
            field=where,
            description=f"Must be greater than or equal to {_number(spec.minimum)}",
        )
    if spec.maximum is not None and value > spec.maximum:
        return InvalidField(
            type="number_lte",
            field=where,
            description=f"Must be less than or equal to {_number(spec.maximum)}",
        )
    synonym = spec.name == "output_format" and value == "jpeg"
    if spec.choices is not None and value not in spec.choices and not synonym:
        allowed = ", ".join(f'"{choice}"' for choice in spec.choices)
        return InvalidField(
            type="enum",
            field=where,
            description=f"{spec.name} must be one of the following: {allowed}",
        )
    return None


def _unsupported(spec: InputField, value: Any) -> InvalidField | None:
    used = spec.role == "unsupported" and value not in (None, "")
    if not used and not (spec.name == "refine" and value != "no_refiner"):
        return None
    return InvalidField(
        type="unsupported", field=f"input.{spec.name}", description=spec.unsupported_reason
    )


def parse_input(raw: Any, info: pb.ModelInfo) -> ParsedInput:
    """Check `raw` against the schema of Kiln model `info` and build its GenerateRequest.

    Absent fields take the Kiln model's defaults (resolved by the server), except `prompt`,
    which defaults to Replicate's SDXL example prompt as it does on Replicate (the FLUX
    schemas require it, as Replicate's do).

    Raises:
        InputInvalid: listing every invalid field, each named `input.<name>`.
    """
    if not isinstance(raw, Mapping):
        raise InputInvalid(
            [
                InvalidField(
                    type="invalid_type",
                    field="input",
                    description=f"Invalid type. Expected: object, given: {_json_type(raw)}",
                )
            ]
        )
    specs = {spec.name: spec for spec in input_fields(info)}
    problems: list[InvalidField] = []
    values: dict[str, Any] = {}
    notes: list[str] = []
    for name, value in raw.items():
        spec = specs.get(name)
        if spec is None:
            continue
        if value is None and (spec.role == "unsupported" or name in _NULLABLE_LORA_INPUTS):
            continue
        if name in IMAGE_INPUTS and value in (None, ""):
            continue
        typed, problem = _typed(spec, value)
        problem = problem or _unsupported(spec, typed) or _checked(spec, typed)
        if problem is not None:
            problems.append(problem)
            continue
        values[name] = typed
        if spec.role == "noop" and typed != spec.default:
            notes.append(f"{name} is accepted but has no effect in Kiln: {spec.description}")
    unknown = sorted(set(raw) - set(specs))
    if unknown:
        notes.append(_unknown_note(unknown))
    problems += [
        InvalidField(type="required", field=f"input.{name}", description=f"{name} is required")
        for name, spec in specs.items()
        if spec.required and name not in values and raw.get(name) is None
    ]
    problems += _conditioning_problems(values, info)
    loras, lora_urls, lora_problems = _lora_inputs(values, info)
    problems += lora_problems
    notes += _lora_notes(values)
    if problems:
        raise InputInvalid(problems)
    notes += _conditioning_notes(values, specs)
    if info.family == "flux":
        from kiln_gateway.flux_schema import flux_request_values  # see input_fields

        values = flux_request_values(values, info)
    output_format = values.get("output_format", "png")
    try:
        request = build_request(
            values.get("prompt", DEFAULT_PROMPT),
            model=info.name,
            negative_prompt=values.get("negative_prompt", ""),
            width=values.get("width", 0),
            height=values.get("height", 0),
            num_outputs=values.get("num_outputs", 0),
            num_inference_steps=values.get("num_inference_steps", 0),
            guidance_scale=values.get("guidance_scale"),
            scheduler=values.get("scheduler", ""),
            seed=values.get("seed"),
            output_format="jpeg" if output_format == "jpg" else output_format,
            output_quality=values.get("output_quality", 0),
            priority=values.get("priority", "normal"),
            loras=loras,
        )
    except ValueError as error:  # the schema's ranges make this unreachable; never a 500
        name = str(error).split(" ", 1)[0]
        raise InputInvalid(
            [InvalidField(type="invalid_value", field=f"input.{name}", description=str(error))]
        ) from error
    if "image" in values:
        if "prompt_strength" in values:
            request.strength = values["prompt_strength"]
        if "mask" in values:
            if "keep_unmasked" in values:
                request.keep_unmasked = values["keep_unmasked"]
            if "mask_crop_padding" in values:
                request.mask_crop_padding = values["mask_crop_padding"]
    return ParsedInput(
        request,
        bool(values.get("output_as_data_uri", False)),
        notes,
        images={name: values[name] for name in IMAGE_INPUTS if name in values},
        known={name: value for name, value in raw.items() if name in specs},
        lora_urls=lora_urls,
    )


_MAX_NAMED = 10


def _unknown_note(names: list[str]) -> str:
    """The log note for dropped input fields, each name cut short and at most ten named."""
    shown = ", ".join(shorten(repr(name)[1:-1], 40) for name in names[:_MAX_NAMED])
    more = f" and {len(names) - _MAX_NAMED} more" if len(names) > _MAX_NAMED else ""
    return f"ignoring input field(s) this model does not have: {shown}{more}"


def _conditioning_problems(values: dict[str, Any], info: pb.ModelInfo) -> list[InvalidField]:
    """What the image inputs break together (each input alone passed its own checks)."""
    problems: list[InvalidField] = []
    has_image, has_mask = "image" in values, "mask" in values
    if has_mask and not has_image:
        problems.append(
            InvalidField(
                type="required",
                field="input.mask",
                description="a mask needs an image: give input.image too (the photo it covers)",
            )
        )
    if info.inpainting and not (has_image and has_mask):
        problems.append(
            InvalidField(
                type="required",
                field="input.image" if not has_image else "input.mask",
                description=f"Kiln model {info.name} is an inpainting model: it needs both "
                "image and mask",
            )
        )
    if has_image and values.get("prompt_strength") == 0:
        problems.append(
            InvalidField(
                type="number_gt",
                field="input.prompt_strength",
                description="Must be greater than 0 with an image (0 would return the image "
                "unchanged)",
            )
        )
    return problems


def _is_url(text: str) -> bool:
    return "://" in text or text[:5].lower() == "data:"


def _lora_notes(values: dict[str, Any]) -> list[str]:
    """Notes for LoRA scales given without the LoRA they scale."""
    notes = []
    weights = "replicate_weights" in values or "lora_weights" in values
    if "lora_scale" in values and not weights and values["lora_scale"] != REPLICATE_LORA_SCALE:
        notes.append(
            "lora_scale is accepted but has no effect without replicate_weights or lora_weights"
        )
    extra_alone = "extra_lora_scale" in values and "extra_lora" not in values
    if extra_alone and values["extra_lora_scale"] != FLUX_LORA_SCALE:
        notes.append("extra_lora_scale is accepted but has no effect without extra_lora")
    return notes


def _lora_inputs(
    values: dict[str, Any], info: pb.ModelInfo
) -> tuple[list[tuple[str, float]], list[LoraUrl], list[InvalidField]]:
    """The (name, scale) pairs of `loras` and of the LoRA inputs given by name, the LoRA
    inputs given as URLs, and their problems.

    Names, duplicates and the most per request are the Kiln server's to check (its
    violations come back as `input.loras[i].name`); here only the shapes, the scale range,
    and that a LoRA input's name is one the model lists.
    """
    pairs: list[tuple[str, float]] = []
    problems: list[InvalidField] = []
    entries = values.get("loras", [])
    if len(entries) > _MAX_LORAS_GIVEN:
        problems.append(
            InvalidField(
                type="too_long",
                field="input.loras",
                description=f"holds {len(entries)} entries; Kiln applies at most "
                f"{info.max_loras_per_request or _MAX_LORAS_GIVEN}",
            )
        )
        entries = []
    for index, entry in enumerate(entries):
        where = f"input.loras[{index}]"
        name = entry.get("name") if isinstance(entry, Mapping) else None
        if not isinstance(name, str) or not name:
            problems.append(
                InvalidField(
                    type="invalid_type",
                    field=f"{where}.name" if isinstance(entry, Mapping) else where,
                    description='each LoRA is an object {"name": string, "scale": number}',
                )
            )
            continue
        scale = entry.get("scale", 1.0)
        if scale is None:
            scale = 1.0
        if (
            isinstance(scale, bool)
            or not isinstance(scale, int | float)
            or not math.isfinite(float(scale))
            or not -MAX_LORA_SCALE <= float(scale) <= MAX_LORA_SCALE
        ):
            problems.append(
                InvalidField(
                    type="invalid_value",
                    field=f"{where}.scale",
                    description=f"Must be a number from -{MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}",
                )
            )
            continue
        pairs.append((name, float(scale)))
    if values.get("replicate_weights") and values.get("lora_weights"):
        problems.append(
            InvalidField(
                type="conflict",
                field="input.lora_weights",
                description="give replicate_weights or lora_weights, not both (the same "
                "input under its SDXL and its FLUX-style name)",
            )
        )
    scales = {
        "replicate_weights": values.get("lora_scale", REPLICATE_LORA_SCALE),
        "lora_weights": values.get("lora_scale", FLUX_LORA_SCALE),
        "extra_lora": values.get("extra_lora_scale", FLUX_LORA_SCALE),
    }
    urls: list[LoraUrl] = []
    known = {lora.name for lora in info.loras}
    for name in LORA_URL_INPUTS:
        weights = values.get(name)
        if not weights:
            continue
        if _is_url(weights):
            urls.append(LoraUrl(name, weights, float(scales[name])))
        elif weights.removesuffix(".safetensors") not in known:
            problems.append(
                InvalidField(
                    type="invalid_value",
                    field=f"input.{name}",
                    description=f"{shorten(weights, 60)!r} is not a LoRA of this model"
                    f"{_lora_names(info)}; or give the URL of a .safetensors LoRA",
                )
            )
        else:
            pairs.append((weights, float(scales[name])))
    return pairs, urls, problems


def _conditioning_notes(values: dict[str, Any], specs: dict[str, InputField]) -> list[str]:
    """Notes for image-conditioning inputs given where they cannot act."""
    needs = {"prompt_strength": "image", "keep_unmasked": "mask", "mask_crop_padding": "mask"}
    return [
        f"{name} is accepted but has no effect without input.{needed}"
        for name, needed in needs.items()
        if name in values and needed not in values and values[name] != specs[name].default
    ]


_KILN_TO_REPLICATE = {"strength": "prompt_strength"}


def replicate_field(kiln_field: str) -> str:
    """The input name a Kiln request field is given as (`strength` is `prompt_strength`)."""
    return _KILN_TO_REPLICATE.get(kiln_field, kiln_field)


def violations_to_fields(violations: list[tuple[str, str]]) -> list[InvalidField]:
    """The Kiln server's field violations (INVALID_ARGUMENT) as Replicate's invalid fields."""
    return [
        InvalidField(
            type="invalid_value",
            field=f"input.{shorten(replicate_field(name), 60)}",
            description=shorten(description, 300),
        )
        for name, description in violations
    ] or [InvalidField(type="invalid_value", field="input", description="rejected by Kiln")]
