"""Building `GenerateRequest` messages from plain Python values.

`build_request` is the one place that turns friendly arguments ("webp", "high", None for
"model default", a path for `image`) into the wire message. It checks only what it can
without the model: what the message itself cannot hold (negative sizes, unknown format
names, strength outside (0, 1]), arguments that need another (a mask needs an image), and
input files that are missing, unreadable, empty or over `MAX_IMAGE_BYTES`. Limits that
depend on the model are the server's to enforce, and it names the offending field when it
does.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

from kiln_client.image_input import MAX_IMAGE_BYTES, ImageInput, read_image_input
from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb

__all__ = [
    "OUTPUT_FORMATS",
    "PREVIEW_FORMATS",
    "PREVIEW_METHODS",
    "PRIORITIES",
    "LoraSpec",
    "build_request",
    "lora_weights",
    "output_format_value",
    "preview_format_value",
    "preview_method_value",
    "priority_value",
    "strength_value",
]

OUTPUT_FORMATS: dict[str, pb.OutputFormat.ValueType] = {
    "png": pb.OUTPUT_FORMAT_PNG,
    "jpeg": pb.OUTPUT_FORMAT_JPEG,
    "jpg": pb.OUTPUT_FORMAT_JPEG,
    "webp": pb.OUTPUT_FORMAT_WEBP,
}
"""Accepted `output_format` names (case-insensitive) and their enum values."""

PREVIEW_FORMATS: dict[str, pb.PreviewFormat.ValueType] = {
    "jpeg": pb.PREVIEW_FORMAT_JPEG,
    "jpg": pb.PREVIEW_FORMAT_JPEG,
    "webp": pb.PREVIEW_FORMAT_WEBP,
}
"""Accepted `preview_format` names (case-insensitive) and their enum values."""

PREVIEW_METHODS: dict[str, pb.PreviewMethod.ValueType] = {
    "auto": pb.PREVIEW_METHOD_UNSPECIFIED,
    "latent_rgb": pb.PREVIEW_METHOD_LATENT_RGB,
    "latent-rgb": pb.PREVIEW_METHOD_LATENT_RGB,
    "decoder": pb.PREVIEW_METHOD_DECODER,
}
"""Accepted `preview_method` names (case-insensitive; "auto" = the model's best: its learned
decoder where it has one, else latent_rgb) and their enum values."""

PRIORITIES: dict[str, pb.Priority.ValueType] = {
    "low": pb.PRIORITY_LOW,
    "normal": pb.PRIORITY_NORMAL,
    "high": pb.PRIORITY_HIGH,
}
"""Accepted `priority` names (case-insensitive) and their enum values."""

# Alternative spellings left out of the choices an error lists.
_ALIASES = frozenset({"jpg", "latent-rgb"})
_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1

LoraSpec = str | tuple[str, float]
"""One LoRA for `build_request`: a name (scale 1.0) or a (name, scale) pair."""


def _enum_value(
    argument: str,
    value: str | int,
    names: dict[str, int],
    valid_numbers: list[int],
) -> int:
    if isinstance(value, str):
        number = names.get(value.strip().lower())
        if number is None:
            choices = ", ".join(sorted({k for k in names if k not in _ALIASES}))
            raise ValueError(f"{argument} must be one of {choices}; got {value!r}")
        return number
    if isinstance(value, int) and not isinstance(value, bool) and value in valid_numbers:
        return value
    raise ValueError(f"{argument} must be a name or one of the enum values; got {value!r}")


def output_format_value(value: str | int) -> pb.OutputFormat.ValueType:
    """The `OutputFormat` for "png" / "jpeg" / "webp" (or an enum value); ValueError if unknown."""
    number = _enum_value(
        "output_format", value, dict(OUTPUT_FORMATS), list(pb.OutputFormat.values())
    )
    return pb.OutputFormat.ValueType(number)


def preview_format_value(value: str | int) -> pb.PreviewFormat.ValueType:
    """The `PreviewFormat` for "jpeg" / "webp" (or an enum value); ValueError if unknown."""
    number = _enum_value(
        "preview_format", value, dict(PREVIEW_FORMATS), list(pb.PreviewFormat.values())
    )
    return pb.PreviewFormat.ValueType(number)


def preview_method_value(value: str | int) -> pb.PreviewMethod.ValueType:
    """The `PreviewMethod` for "auto" / "latent_rgb" / "decoder" (or an enum value);
    ValueError if unknown."""
    number = _enum_value(
        "preview_method", value, dict(PREVIEW_METHODS), list(pb.PreviewMethod.values())
    )
    return pb.PreviewMethod.ValueType(number)


def priority_value(value: str | int) -> pb.Priority.ValueType:
    """The `Priority` for "low" / "normal" / "high" (or an enum value); ValueError if unknown."""
    number = _enum_value("priority", value, dict(PRIORITIES), list(pb.Priority.values()))
    return pb.Priority.ValueType(number)


def _unsigned(argument: str, value: int, maximum: int = _UINT32_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{argument} must be an integer; got {value!r}")
    if not 0 <= value <= maximum:
        raise ValueError(f"{argument} must be between 0 and {maximum}; got {value}")
    return value


def strength_value(value: float) -> float:
    """`value` as a float when 0 < value <= 1 (the range `strength` takes); ValueError if not.

    The message names `strength` and the value; NaN, infinities, booleans and non-numbers are
    refused like any value outside the range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"strength must be a number; got {value!r}")
    number = float(value)
    if not (math.isfinite(number) and 0.0 < number <= 1.0):
        raise ValueError(f"strength must be greater than 0 and at most 1; got {value!r}")
    return number


def _lora_scale(name: str, scale: object) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ValueError(f"loras: the scale of {name!r} must be a number; got {scale!r}")
    number = float(scale)
    if not math.isfinite(number):
        raise ValueError(f"loras: the scale of {name!r} must be finite; got {scale!r}")
    return number


def lora_weights(
    loras: Mapping[str, float] | Iterable[LoraSpec],
) -> list[pb.LoraWeight]:
    """`LoraWeight` messages for a mapping name -> scale, or a list of names (scale 1.0)
    and (name, scale) pairs; ValueError naming `loras` for anything else.

    Only the shape is checked here; the server checks names, duplicates, the scale range
    and the most LoRAs per request (ModelInfo.max_loras_per_request).
    """
    if isinstance(loras, str | bytes):
        raise ValueError("loras must be a list of names or (name, scale) pairs, not a string")
    pairs: list[tuple[object, object]]
    if isinstance(loras, Mapping):
        pairs = list(loras.items())
    else:
        pairs = []
        for entry in loras:
            if isinstance(entry, str):
                pairs.append((entry, 1.0))
            elif isinstance(entry, tuple) and len(entry) == 2:
                pairs.append((entry[0], entry[1]))
            else:
                raise ValueError(
                    f"loras entries must be a name or a (name, scale) pair; got {entry!r}"
                )
    weights = []
    for name, scale in pairs:
        if not isinstance(name, str) or not name:
            raise ValueError(f"loras: a LoRA name must be a non-empty string; got {name!r}")
        weights.append(pb.LoraWeight(name=name, scale=_lora_scale(name, scale)))
    return weights


def _needs(argument: str, value: object, required: str, given: object, why: str) -> None:
    if value is not None and given is None:
        raise ValueError(f"{argument} needs {required}: {why}")


def build_request(
    prompt: str,
    *,
    model: str = "",
    negative_prompt: str = "",
    width: int = 0,
    height: int = 0,
    num_outputs: int = 0,
    num_inference_steps: int = 0,
    guidance_scale: float | None = None,
    scheduler: str = "",
    seed: int | None = None,
    output_format: str | int = "png",
    output_quality: int = 0,
    preview_every: int = 0,
    preview_max_size: int = 0,
    preview_format: str | int = "jpeg",
    priority: str | int = "normal",
    preview_quality: int = 0,
    preview_method: str | int = "auto",
    image: ImageInput | None = None,
    mask: ImageInput | None = None,
    strength: float | None = None,
    keep_unmasked: bool | None = None,
    mask_crop_padding: int | None = None,
    max_image_bytes: int = MAX_IMAGE_BYTES,
    loras: Mapping[str, float] | Iterable[LoraSpec] | None = None,
) -> pb.GenerateRequest:
    """Build a `GenerateRequest`; zero / empty / None arguments mean "the model's default".

    `seed` and `guidance_scale` stay absent from the message when None (a random seed, the
    model's guidance). Previews are requested only when `preview_every` > 0, every that many
    steps, at most `preview_max_size` pixels on the long side (0 = server default).
    `preview_method` is "auto" (the model's best: its learned preview decoder where it has
    one), "latent_rgb" or "decoder". `output_format`, `preview_format`, `preview_method` and
    `priority` take a name or the enum value.

    Image conditioning: `image` alone is image-to-image, `image` with `mask` inpainting
    (white repaints, black keeps, grey blends). Each takes a path, the encoded bytes (PNG,
    JPEG or WebP), a binary file object or a PIL image (sent as lossless PNG); see
    `kiln_client.image_input.ImageInput`. Without `width` and `height` the output has the
    image's size (rounded down to the model's size multiple). `strength` (0 < s <= 1, None =
    the model's default, 0.8) is how far the result may move from the image; with a mask,
    `keep_unmasked` (None = on) keeps the photo's pixels exactly where the mask is black, and
    `mask_crop_padding` (None = no crop) generates only around the mask's bounding box grown
    by that many pixels. The three are set in the message only when given. Inputs larger
    than `max_image_bytes` (default `MAX_IMAGE_BYTES`, 20 MiB) are refused before sending;
    raise it only for a server whose `ModelInfo.max_image_bytes` is higher.

    `loras` applies LoRAs of the model's folders (`ModelInfo.loras`) to this request only:
    a list of names (scale 1.0) and (name, scale) pairs, e.g. `[("ink", 0.8), "paper"]`, or
    a mapping name -> scale. Scale 0 turns a LoRA off; the server takes -4 to 4.

    Raises:
        ValueError: an argument the message cannot carry (unknown format or priority name,
            negative or oversized integer, strength outside (0, 1]) or one given without
            the argument it needs (`mask`, `strength` without `image`; `keep_unmasked`,
            `mask_crop_padding` without `mask`); the message names the argument.
        ImageInputError (a ValueError): `image` or `mask` is a missing or unreadable file,
            empty, or over `max_image_bytes`; the message names the argument and the path.
        TypeError: `image` or `mask` is not a path, bytes, file object or PIL image.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string; got {type(prompt).__name__}")
    # Cheap argument checks first, so a mistake is reported before any file is read.
    _needs("mask", mask, "an image", image, "it marks which pixels of the image to repaint")
    _needs("strength", strength, "an image", image, "it says how far to move from the image")
    _needs("keep_unmasked", keep_unmasked, "a mask", mask, "it keeps the mask's black pixels")
    _needs("mask_crop_padding", mask_crop_padding, "a mask", mask, "it crops around the mask")
    if strength is not None:
        strength = strength_value(strength)
    if keep_unmasked is not None and not isinstance(keep_unmasked, bool):
        raise ValueError(f"keep_unmasked must be True or False; got {keep_unmasked!r}")
    if mask_crop_padding is not None:
        mask_crop_padding = _unsigned("mask_crop_padding", mask_crop_padding)
    lora_list = lora_weights(loras) if loras is not None else []
    request = pb.GenerateRequest(
        model=model,
        prompt=prompt,
        negative_prompt=negative_prompt,
        width=_unsigned("width", width),
        height=_unsigned("height", height),
        num_outputs=_unsigned("num_outputs", num_outputs),
        num_inference_steps=_unsigned("num_inference_steps", num_inference_steps),
        scheduler=scheduler,
        output_format=output_format_value(output_format),
        output_quality=_unsigned("output_quality", output_quality),
        priority=priority_value(priority),
        loras=lora_list,
    )
    if guidance_scale is not None:
        try:
            request.guidance_scale = float(guidance_scale)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"guidance_scale must be a number; got {guidance_scale!r}") from exc
    if seed is not None:
        request.seed = _unsigned("seed", seed, _UINT64_MAX)
    preview_every = _unsigned("preview_every", preview_every)
    preview_max_size = _unsigned("preview_max_size", preview_max_size)
    preview_quality = _unsigned("preview_quality", preview_quality)
    preview_kind = preview_format_value(preview_format)
    method = preview_method_value(preview_method)
    if preview_every > 0:
        request.preview.CopyFrom(
            pb.PreviewOptions(
                every_n_steps=preview_every,
                max_size=preview_max_size,
                format=preview_kind,
                quality=preview_quality,
                method=method,
            )
        )
    if image is not None:
        request.image = read_image_input("image", image, max_image_bytes)
    if mask is not None:
        request.mask = read_image_input("mask", mask, max_image_bytes)
    if strength is not None:
        request.strength = strength
        if request.strength <= 0.0:
            raise ValueError(
                f"strength must be greater than 0 and at most 1; got {strength!r}, which "
                "rounds to 0 as the 32-bit float the message carries"
            )
    if keep_unmasked is not None:
        request.keep_unmasked = keep_unmasked
    if mask_crop_padding is not None:
        request.mask_crop_padding = mask_crop_padding
    return request
