"""Request validation: every field checked before any work, every problem named.

`validate_request` resolves a GenerateRequest against the model's defaults and limits into
GenerationParams, or raises RequestInvalid listing one violation per offending field (the
API turns it into INVALID_ARGUMENT with google.rpc.BadRequest), or ModelNotFound.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_server.engines.limits import PREVIEW_DECODER, PREVIEW_LATENT_RGB, EngineLimits
from kiln_server.image_inputs import (
    FramedInputs,
    ImageInputError,
    ImageInputLimits,
    decode_image,
    frame_inputs,
    round_down,
)
from kiln_server.lora import policy as lora_policy
from kiln_server.lora.errors import LoraNotFound
from kiln_server.lora.folders import LORA_SUFFIX, LoraFolders
from kiln_server.models.registry import ModelRegistry, ModelSpec
from kiln_server.pipeline.families import rows_per_image, scheduler_names_for
from kiln_server.pipeline.params import GenerationParams, LoraUse, PreviewParams
from kiln_server.user_text import quoted, shorten

MAX_PROMPT_CHARS = 4096
MAX_SEED = 2**64 - 1
OUTPUT_FORMATS = {
    pb.OUTPUT_FORMAT_UNSPECIFIED: "png",
    pb.OUTPUT_FORMAT_PNG: "png",
    pb.OUTPUT_FORMAT_JPEG: "jpeg",
    pb.OUTPUT_FORMAT_WEBP: "webp",
}
PREVIEW_FORMATS = {
    pb.PREVIEW_FORMAT_UNSPECIFIED: "jpeg",
    pb.PREVIEW_FORMAT_JPEG: "jpeg",
    pb.PREVIEW_FORMAT_WEBP: "webp",
}
# Requested methods by enum value; UNSPECIFIED (None) resolves to the model's best.
PREVIEW_METHODS: dict[int, str | None] = {
    pb.PREVIEW_METHOD_UNSPECIFIED: None,
    pb.PREVIEW_METHOD_LATENT_RGB: PREVIEW_LATENT_RGB,
    pb.PREVIEW_METHOD_DECODER: PREVIEW_DECODER,
}
PRIORITIES = {
    pb.PRIORITY_UNSPECIFIED: 2,
    pb.PRIORITY_LOW: 1,
    pb.PRIORITY_NORMAL: 2,
    pb.PRIORITY_HIGH: 3,
}
DEFAULT_OUTPUT_QUALITY = 90
DEFAULT_PREVIEW_SIZE = 256
DEFAULT_PREVIEW_QUALITY = 75
MIN_PREVIEW_SIZE = 16
MAX_PREVIEW_SIZE = 1024
MAX_CROP_PADDING = 4096
# LoraWeight.scale must be finite and within +-MAX_LORA_SCALE.
MAX_LORA_SCALE = 4.0
DEFAULT_MAX_LORAS = 4


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field and why, as google.rpc.BadRequest.FieldViolation carries it."""

    field: str
    description: str


class RequestInvalid(ValueError):
    """The request has invalid fields; `violations` names each one."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(f"invalid request: {summary}")
        self.violations = violations


class LoraMissing(RequestInvalid):
    """Every violation is a requested LoRA that no LoRA folder of the model holds: the API
    answers NOT_FOUND (still with google.rpc.BadRequest naming `loras[i].name`)."""


class LorasUnsupported(ValueError):
    """The model's backend cannot apply LoRAs; the API answers FAILED_PRECONDITION."""

    def __init__(self, message: str) -> None:
        super().__init__(f"loras: {message}")
        self.message = message


class ModelNotFound(LookupError):
    """The requested model is not served here."""

    def __init__(self, name: str, available: list[str]) -> None:
        super().__init__(
            f"model {quoted(name)} is not served here; available: {', '.join(available)}"
        )
        self.name = shorten(name)


TokenCounter = Callable[[str, str], int]


@dataclass(frozen=True)
class RequestBudget:
    """Server-wide bounds on one request, from the server's settings: its photos'
    decoding limits, and the most work it may ask for in denoising steps x outputs x
    megapixels (a request over it would hold the engine for minutes)."""

    images: ImageInputLimits = field(default_factory=ImageInputLimits)
    max_work: float = 1000.0
    # Most entries one request's `loras` may hold (the `max_loras_per_request` setting).
    max_loras: int = DEFAULT_MAX_LORAS


_NO_LIMITS = EngineLimits(size_multiple=8)


@dataclass(frozen=True)
class ServedLimits:
    """The sizes and outputs a served model admits: its own limits within its engines'.

    A request outside these is refused before any work, so nothing reaches an engine that
    cannot run it. `max_unet_rows` None means the engines take any batch.
    `preview_methods` are the preview methods the engines serve, the default first.
    """

    size_multiple: int
    min_width: int
    max_width: int
    min_height: int
    max_height: int
    max_num_outputs: int
    max_unet_rows: int | None = None
    preview_methods: tuple[str, ...] = (PREVIEW_LATENT_RGB,)
    image_inputs: bool = True
    inpainting: bool = False
    family: str = "sdxl"
    distilled_guidance: bool = False

    @classmethod
    def of(cls, spec: ModelSpec, engines: EngineLimits | None) -> ServedLimits:
        """`spec`'s limits narrowed by the loaded engines' declaration (None: none loaded)."""
        if engines is None:
            return cls(
                8,
                spec.min_size,
                spec.max_size,
                spec.min_size,
                spec.max_size,
                spec.max_num_outputs,
                family=spec.family,
            )
        multiple = math.lcm(8, engines.size_multiple)

        def bounds(axis: str) -> tuple[int, int]:
            low, high = engines.size_range(axis)
            low = max(spec.min_size, low or 0)
            high = min(spec.max_size, high if high is not None else spec.max_size)
            # Round inward to the size step, so both ends are sizes the engines can run.
            return -(-low // multiple) * multiple, high // multiple * multiple

        min_width, max_width = bounds("width")
        min_height, max_height = bounds("height")
        return cls(
            multiple,
            min_width,
            max_width,
            min_height,
            max_height,
            spec.max_num_outputs,
            engines.unet_rows,
            engines.preview_methods,
            engines.image_inputs,
            engines.inpainting,
            spec.family,
            engines.distilled_guidance,
        )

    def size_range(self, axis: str) -> tuple[int, int]:
        """(min, max) pixels along 'width' or 'height'."""
        if axis == "width":
            return self.min_width, self.max_width
        return self.min_height, self.max_height

    def rows_per_image(self, guidance_scale: float, negative_prompt: bool = False) -> int:
        """Denoiser rows one image takes per step: two under classifier-free guidance
        (SDXL above guidance 1; a FLUX model without distilled guidance only with a
        negative prompt, as true CFG), else one."""
        return rows_per_image(
            self.family,
            distilled_guidance=self.distilled_guidance,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
        )

    def outputs_for(self, guidance_scale: float, negative_prompt: bool = False) -> int:
        """Most outputs one request may ask for at `guidance_scale`: the model's maximum,
        and no more than one denoiser call takes (`rows_per_image` each)."""
        if self.max_unet_rows is None:
            return self.max_num_outputs
        per_image = self.rows_per_image(guidance_scale, negative_prompt)
        return min(self.max_num_outputs, self.max_unet_rows // per_image)


def _check_size(name: str, value: int, limits: ServedLimits, errors: list[FieldViolation]) -> None:
    low, high = limits.size_range(name)
    if low > high:
        errors.append(
            FieldViolation(
                name,
                f"this model's engines run no {name} in steps of {limits.size_multiple} "
                "within the model's limits; rebuild them with `kiln build-engines`",
            )
        )
        return
    if value % limits.size_multiple:
        errors.append(
            FieldViolation(
                name,
                f"must be a multiple of {limits.size_multiple} for this model's engines, "
                f"got {value}",
            )
        )
    elif not low <= value <= high:
        errors.append(FieldViolation(name, f"must be between {low} and {high}, got {value}"))


def _check_prompt(
    name: str, text: str, spec: ModelSpec, count_tokens: TokenCounter, max_tokens: int
) -> FieldViolation | None:
    if len(text) > MAX_PROMPT_CHARS:
        return FieldViolation(name, f"is {len(text)} characters; at most {MAX_PROMPT_CHARS}")
    tokens = count_tokens(spec.name, text)
    if tokens > max_tokens:
        return FieldViolation(
            name, f"is {tokens} tokens; this model reads at most {max_tokens} (shorten it)"
        )
    return None


@dataclass
class _Photo:
    """The request's decoded photo and mask (None where absent or refused)."""

    image: Image.Image | None = None
    mask: Image.Image | None = None


def _decode_photo(
    request: pb.GenerateRequest,
    spec: ModelSpec,
    limits: ServedLimits,
    image_limits: ImageInputLimits,
    errors: list[FieldViolation],
) -> _Photo:
    """Decode `image` and `mask` and check the fields that go with them."""
    photo = _Photo()
    if limits.inpainting and not (request.image and request.mask):
        errors.append(
            FieldViolation(
                "image" if not request.image else "mask",
                f"model {spec.name!r} is an inpainting model (its UNet takes a mask): send "
                "both image and mask",
            )
        )
    # The fields that only mean something beside an image (and, the last two, a mask).
    given = {
        "mask": bool(request.mask),
        "strength": request.HasField("strength"),
        "keep_unmasked": request.HasField("keep_unmasked"),
        "mask_crop_padding": request.HasField("mask_crop_padding"),
    }
    if not request.image:
        for name in (name for name, present in given.items() if present):
            errors.append(FieldViolation(name, "needs an image; send `image` too"))
        return photo
    if not limits.image_inputs:
        errors.append(
            FieldViolation(
                "image",
                f"model {spec.name!r} is served without a VAE encoder, so it cannot take "
                "images; rebuild its engines with `kiln build-engines` (it exports one)",
            )
        )
        return photo
    if request.mask and limits.family == "flux":
        errors.append(
            FieldViolation(
                "mask",
                f"model {spec.name!r} is a FLUX model: it takes image-to-image (image, "
                "strength) but no mask yet; send no mask",
            )
        )
        return photo
    if not request.mask:
        for name in ("keep_unmasked", "mask_crop_padding"):
            if given[name]:
                errors.append(FieldViolation(name, "needs a mask; send `mask` too"))
    try:
        photo.image = decode_image(request.image, "image", image_limits)
        if request.mask:
            photo.mask = decode_image(request.mask, "mask", image_limits)
    except ImageInputError as error:
        errors.append(FieldViolation(error.field, error.message))
        return _Photo()
    if photo.mask is not None and not np.asarray(photo.mask.convert("L")).any():
        errors.append(
            FieldViolation(
                "mask",
                "is black everywhere, so nothing would be repainted (white repaints, black "
                "keeps); is it inverted?",
            )
        )
    return photo


def _framed_inputs(
    request: pb.GenerateRequest,
    photo: _Photo,
    spec: ModelSpec,
    size: tuple[int, int],
    steps: int,
    errors: list[FieldViolation],
) -> FramedInputs | None:
    """The photo framed for the loop, once strength checks out; None on a problem."""
    strength = request.strength if request.HasField("strength") else spec.default_strength
    if not (math.isfinite(strength) and 0.0 < strength <= 1.0):
        errors.append(FieldViolation("strength", f"must be in (0, 1], got {strength}"))
        return None
    if int(steps * strength) < 1:
        errors.append(
            FieldViolation(
                "strength",
                f"leaves no denoising step: int(num_inference_steps x strength) = "
                f"int({steps} x {strength:g}) = 0; raise strength or num_inference_steps",
            )
        )
        return None
    if photo.image is None or errors:
        return None
    padding = request.mask_crop_padding if request.HasField("mask_crop_padding") else None
    if padding is not None and padding > MAX_CROP_PADDING:
        errors.append(
            FieldViolation(
                "mask_crop_padding", f"must be at most {MAX_CROP_PADDING}, got {padding}"
            )
        )
        return None
    return frame_inputs(
        photo.image,
        photo.mask,
        width=size[0],
        height=size[1],
        strength=float(strength),
        keep_unmasked=request.keep_unmasked if request.HasField("keep_unmasked") else True,
        crop_padding=padding,
    )


def _output_size(
    request: pb.GenerateRequest,
    spec: ModelSpec,
    limits: ServedLimits,
    photo: _Photo,
    errors: list[FieldViolation],
) -> tuple[int, int]:
    """Width and height: as asked; else the photo's size rounded down to the size step
    (not when cropping to the mask, which generates at the model's default size); else the
    model's default. A photo-derived size outside the limits is refused naming `image`."""
    derived = photo.image is not None and not request.HasField("mask_crop_padding")
    if derived and not (request.width and request.height):
        assert photo.image is not None
        width, height = round_down(photo.image.size, limits.size_multiple)
        low_w, high_w = limits.size_range("width")
        low_h, high_h = limits.size_range("height")
        if (not request.width and not low_w <= width <= high_w) or (
            not request.height and not low_h <= height <= high_h
        ):
            errors.append(
                FieldViolation(
                    "image",
                    f"is {photo.image.width}x{photo.image.height}, which makes "
                    f"{width}x{height} outputs (rounded down to multiples of "
                    f"{limits.size_multiple}); this model serves widths {low_w}-{high_w} and "
                    f"heights {low_h}-{high_h}: resize the photo, or give width and height "
                    "(the photo is resized to them)",
                )
            )
        return request.width or width, request.height or height
    return request.width or spec.default_width, request.height or spec.default_height


def lora_name(name: str) -> str:
    """The name a LoRA is listed and applied under: its file name without the suffix."""
    return name[: -len(LORA_SUFFIX)] if name.endswith(LORA_SUFFIX) else name


def _check_loras(
    request: pb.GenerateRequest,
    spec: ModelSpec,
    max_loras: int,
    errors: list[FieldViolation],
    missing: list[FieldViolation],
) -> tuple[LoraUse, ...]:
    """The request's LoRAs resolved against the model's LoRA folders.

    Bad names, scales, duplicates and a list over `max_loras` go to `errors`; names that
    are plain file names but no file of the folders go to `missing` (NOT_FOUND when alone).
    Names are checked as names before any file system call, and resolving never leaves the
    folders (`LoraFolders`).
    """
    loras = request.loras
    if not loras:
        return ()
    if len(loras) > max_loras:
        errors.append(
            FieldViolation(
                "loras", f"holds {len(loras)} LoRAs; this server applies at most {max_loras}"
            )
        )
        return ()
    if not spec.lora_dirs:
        errors.append(
            FieldViolation(
                "loras",
                f"model {spec.name!r} has no LoRA folders (`lora_dirs` in its configuration, "
                "or a `loras/` folder in the model folder), so it applies no LoRA",
            )
        )
        return ()
    folders = LoraFolders.of(spec.lora_dirs)
    uses: list[LoraUse] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(loras):
        where = f"loras[{index}]"
        scale = entry.scale if entry.HasField("scale") else 1.0
        if not (math.isfinite(scale) and -MAX_LORA_SCALE <= scale <= MAX_LORA_SCALE):
            errors.append(
                FieldViolation(
                    f"{where}.scale",
                    f"must be between {-MAX_LORA_SCALE:g} and {MAX_LORA_SCALE:g}, got {scale}",
                )
            )
        try:
            file_name = folders.file_name(entry.name)
        except LoraNotFound as error:
            errors.append(
                FieldViolation(f"{where}.name", f"LoRA {quoted(entry.name)}: {error.reason}")
            )
            continue
        name = lora_name(file_name)
        if name in seen:
            errors.append(
                FieldViolation(
                    f"{where}.name",
                    f"LoRA {quoted(name)} is already loras[{seen[name]}]; name each LoRA once "
                    "(give one entry the combined scale)",
                )
            )
            continue
        seen[name] = index
        try:
            folders.resolve(file_name)
        except LoraNotFound as error:
            missing.append(
                FieldViolation(
                    f"{where}.name",
                    f"LoRA {quoted(entry.name)}: {error.reason} (ListModels lists the "
                    "model's LoRAs)",
                )
            )
            continue
        uses.append(LoraUse(name=name, scale=float(scale)))
    return tuple(uses)


def validate_request(
    request: pb.GenerateRequest,
    registry: ModelRegistry,
    count_tokens: TokenCounter,
    max_tokens: Callable[[str], int],
    engine_limits: Callable[[str], EngineLimits | None] = lambda _model: None,
    budget: RequestBudget | None = None,
    backend: Callable[[str], str | None] = lambda _model: None,
) -> GenerationParams:
    """Resolve defaults and check every field; raise RequestInvalid or ModelNotFound.

    `loras` are refused with LorasUnsupported when `backend(model)` (None: not known yet)
    cannot apply them, and with LoraMissing when the only problem is LoRA names that are
    no file of the model's LoRA folders. Entries at scale 0 are kept: the engine applies
    them as off, which gives the base model's bytes.

    Sizes and output counts are checked against the model's limits narrowed by
    `engine_limits(model)`, what its loaded engines declare they can run. Request images
    are decoded within the `budget`'s limits and framed to the output size, and the
    request's work must fit the budget.
    """
    spec = registry.get(request.model)
    if spec is None:
        raise ModelNotFound(request.model, sorted(registry.models))
    errors: list[FieldViolation] = []
    token_limit = max_tokens(spec.name)
    budget = budget or RequestBudget()
    if spec.family == "flux" and any(lora.scale != 0.0 for lora in request.loras):
        raise LorasUnsupported(f"loras: FLUX models serve no LoRAs yet; {spec.name!r} is one")
    if request.loras:
        served_by = backend(spec.name)
        refusal = lora_policy.refusal_for_backend(served_by) if served_by else None
        if refusal is not None:
            raise LorasUnsupported(refusal)

    if not request.prompt.strip():
        errors.append(FieldViolation("prompt", "must not be empty"))
    else:
        problem = _check_prompt("prompt", request.prompt, spec, count_tokens, token_limit)
        if problem:
            errors.append(problem)
    negative_prompt = request.negative_prompt or None
    distilled = (
        spec.family == "flux" and (engine_limits(spec.name) or _NO_LIMITS).distilled_guidance
    )
    if negative_prompt is not None and distilled:
        errors.append(
            FieldViolation(
                "negative_prompt",
                f"model {spec.name!r} embeds distilled guidance (guidance_scale) and takes no "
                "negative prompt; leave it unset",
            )
        )
    elif negative_prompt is not None:
        problem = _check_prompt(
            "negative_prompt", request.negative_prompt, spec, count_tokens, token_limit
        )
        if problem:
            errors.append(problem)
    elif not distilled:
        # The model's own default (kiln.json), e.g. the empty prompt its CFG was trained on.
        negative_prompt = spec.default_negative_prompt
    negative = negative_prompt is not None

    limits = ServedLimits.of(spec, engine_limits(spec.name))
    photo = _decode_photo(request, spec, limits, budget.images, errors)
    size_errors = len(errors)
    width, height = _output_size(request, spec, limits, photo, errors)
    if len(errors) == size_errors:  # a photo-derived size is already refused as `image`
        _check_size("width", width, limits, errors)
        _check_size("height", height, limits, errors)

    steps = request.num_inference_steps or spec.default_num_inference_steps
    if steps > spec.max_num_inference_steps:
        errors.append(
            FieldViolation(
                "num_inference_steps",
                f"must be between 1 and {spec.max_num_inference_steps}, got {steps}",
            )
        )

    guidance = (
        request.guidance_scale
        if request.HasField("guidance_scale")
        else spec.default_guidance_scale
    )
    if not math.isfinite(guidance) or not 0.0 <= guidance <= spec.max_guidance_scale:
        errors.append(
            FieldViolation(
                "guidance_scale",
                f"must be between 0 and {spec.max_guidance_scale}, got {guidance}",
            )
        )

    num_outputs = request.num_outputs or 1
    if num_outputs > spec.max_num_outputs:
        errors.append(
            FieldViolation(
                "num_outputs", f"must be between 1 and {spec.max_num_outputs}, got {num_outputs}"
            )
        )
    elif math.isfinite(guidance) and limits.outputs_for(guidance, negative) == 0:
        errors.append(
            FieldViolation(
                "guidance_scale",
                f"must be at most 1 for this model's engines: they run "
                f"{limits.max_unet_rows} denoiser row per call, and guidance above 1 needs two "
                f"per image; got {guidance:g}",
            )
        )
    elif math.isfinite(guidance) and num_outputs > limits.outputs_for(guidance, negative):
        errors.append(
            FieldViolation(
                "num_outputs",
                f"must be at most {limits.outputs_for(guidance, negative)} at guidance_scale "
                f"{guidance:g}: "
                f"this model's engines run at most {limits.max_unet_rows} UNet rows per call, "
                f"two per image under guidance; got {num_outputs}",
            )
        )

    scheduler = request.scheduler or spec.default_scheduler
    schedulers = scheduler_names_for(spec.family)
    if scheduler not in schedulers:
        errors.append(
            FieldViolation(
                "scheduler",
                f"unknown scheduler {quoted(scheduler)} for a {spec.family} model; choose "
                f"one of {', '.join(schedulers)}",
            )
        )

    seed = request.seed if request.HasField("seed") else random.randrange(2**32)
    if seed + num_outputs - 1 > MAX_SEED:
        errors.append(FieldViolation("seed", "seed + num_outputs - 1 must be below 2^64"))

    if request.output_format not in OUTPUT_FORMATS:
        errors.append(
            FieldViolation("output_format", f"unknown output format {request.output_format}")
        )
    if request.output_quality > 100:
        errors.append(
            FieldViolation(
                "output_quality", f"must be between 1 and 100, got {request.output_quality}"
            )
        )
    if request.priority not in PRIORITIES:
        errors.append(FieldViolation("priority", f"unknown priority {request.priority}"))

    preview = request.preview
    preview_size = preview.max_size or DEFAULT_PREVIEW_SIZE
    if not MIN_PREVIEW_SIZE <= preview_size <= MAX_PREVIEW_SIZE:
        errors.append(
            FieldViolation(
                "preview.max_size",
                f"must be between {MIN_PREVIEW_SIZE} and {MAX_PREVIEW_SIZE}, got {preview_size}",
            )
        )
    if preview.format not in PREVIEW_FORMATS:
        errors.append(FieldViolation("preview.format", f"unknown preview format {preview.format}"))
    if preview.quality > 100:
        errors.append(
            FieldViolation("preview.quality", f"must be between 1 and 100, got {preview.quality}")
        )
    preview_method = limits.preview_methods[0]
    if preview.method not in PREVIEW_METHODS:
        errors.append(FieldViolation("preview.method", f"unknown preview method {preview.method}"))
    else:
        asked = PREVIEW_METHODS[preview.method]
        if asked is not None and asked not in limits.preview_methods:
            errors.append(
                FieldViolation(
                    "preview.method",
                    f"model {spec.name!r} has no learned preview decoder; it previews with "
                    f"{', '.join(limits.preview_methods)} (leave the method unspecified for "
                    "the model's best)",
                )
            )
        preview_method = asked or preview_method

    framed = None
    if request.image:  # without one, `strength` is already refused as needing an image
        framed = _framed_inputs(request, photo, spec, (width, height), steps, errors)
    run_steps = steps if framed is None else max(1, int(steps * framed.conditioning.strength))
    work = run_steps * num_outputs * width * height / 1e6
    if not errors and work > budget.max_work:
        message = (
            f"the request asks for {work:,.0f} units of work (denoising steps x outputs x "
            f"megapixels: {run_steps} x {num_outputs} x {width}x{height}); this server runs "
            f"at most {budget.max_work:,.0f} per request: fewer steps, outputs or pixels"
        )
        for name in ("num_inference_steps", "num_outputs", "width", "height"):
            errors.append(FieldViolation(name, message))

    missing: list[FieldViolation] = []
    loras = _check_loras(request, spec, budget.max_loras, errors, missing)
    if errors:
        raise RequestInvalid(errors + missing)
    if missing:
        raise LoraMissing(missing)
    return GenerationParams(
        prompt=request.prompt,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        num_outputs=num_outputs,
        num_inference_steps=steps,
        guidance_scale=float(guidance),
        scheduler=scheduler,
        seed=seed,
        model=spec.name,
        output_format=OUTPUT_FORMATS[request.output_format],
        output_quality=request.output_quality or DEFAULT_OUTPUT_QUALITY,
        preview=PreviewParams(
            every_n_steps=preview.every_n_steps,
            max_size=preview_size,
            format=PREVIEW_FORMATS[preview.format],
            quality=preview.quality or DEFAULT_PREVIEW_QUALITY,
            method=preview_method,
        ),
        priority=PRIORITIES[request.priority],
        image=framed.conditioning if framed else None,
        overlay=framed.overlay if framed else None,
        loras=loras,
    )
