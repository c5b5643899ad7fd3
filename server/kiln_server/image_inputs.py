"""Request photos in: decode `image` and `mask` within limits, and frame them.

Decoding refuses, before any work, what would cost the server more than a photo should:
bytes over `max_bytes`, a header declaring more than `max_pixels` pixels (a decompression
bomb is caught from its header, before its pixels are decoded), formats other than PNG,
JPEG and WebP, and truncated or corrupt data. Every refusal is an ImageInputError naming
the field.

Framing turns the decoded photo and mask into what the denoising loop runs on (the photo
and mask at the request's width x height, or their crop around the mask) and into the
Overlay that puts the results back over the photo afterwards.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from kiln_server.pipeline.params import ImageConditioning, Overlay

# Decoders PIL may use for request images, and the names errors give them.
FORMATS = ("PNG", "JPEG", "WEBP")
FORMAT_NAMES = "PNG, JPEG or WebP"
# The resampling filter of diffusers' VaeImageProcessor (its default, "lanczos").
RESAMPLE = Image.Resampling.LANCZOS


@dataclass(frozen=True)
class ImageInputLimits:
    """Largest encoded image or mask in bytes, and most pixels either may decode to."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 4096 * 4096


class ImageInputError(ValueError):
    """A request image that is refused; `field` names it ("image" or "mask")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _format_of(data: bytes) -> str | None:
    """The format PIL recognises in `data` from its header, if any (for error texts)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format
    except Exception:  # any failure means "not recognised"
        return None


def decode_image(data: bytes, field: str, limits: ImageInputLimits) -> Image.Image:
    """The image in `data`, fully decoded and upright (EXIF orientation applied).

    Raises ImageInputError naming `field` for data over the limits, another format, or
    data that does not decode.
    """
    if len(data) > limits.max_bytes:
        raise ImageInputError(
            field,
            f"is {len(data):,} bytes; the limit is {limits.max_bytes:,} bytes "
            f"({limits.max_bytes / 2**20:g} MiB)",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        raise ImageInputError(
            field, f"declares more pixels than the limit of {limits.max_pixels:,}"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        found = _format_of(data)
        what = f"a {found} image" if found else "not an image this server can read"
        raise ImageInputError(field, f"is {what}; send {FORMAT_NAMES} bytes") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageInputError(
            field,
            f"is {width}x{height} ({width * height:,} pixels); the limit is "
            f"{limits.max_pixels:,} pixels",
        )
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageInputError(
            field, f"could not be decoded (truncated or corrupt {image.format}): {error}"
        ) from None
    transposed = ImageOps.exif_transpose(image)
    return transposed if transposed is not None else image


def round_down(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """(width, height) rounded down to multiples of `multiple`."""
    return size[0] // multiple * multiple, size[1] // multiple * multiple


def mask_box(mask: np.ndarray, width: int, height: int, padding: int) -> tuple[int, int, int, int]:
    """The region (x1, y1, x2, y2) of `mask` (uint8 [H, W]) to generate in.

    It holds every pixel that is not black, grown by `padding` on each side, then widened
    along one axis to the aspect ratio width : height and kept inside the mask (shifted
    inward where it would cross an edge), as diffusers' `padding_mask_crop` frames it.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    full_h, full_w = mask.shape
    x1 = max(int(cols[0]) - padding, 0)
    x2 = min(int(cols[-1]) + 1 + padding, full_w)
    y1 = max(int(rows[0]) - padding, 0)
    y2 = min(int(rows[-1]) + 1 + padding, full_h)

    def widen(low: int, high: int, wanted: int, limit: int) -> tuple[int, int]:
        extra = wanted - (high - low)
        low -= extra // 2
        high += extra - extra // 2
        if high > limit:
            low, high = low - (high - limit), limit
        if low < 0:
            low, high = 0, min(high - low, limit)
        return low, high

    if (x2 - x1) * height > (y2 - y1) * width:
        y1, y2 = widen(y1, y2, int((x2 - x1) * height / width), full_h)
    else:
        x1, x2 = widen(x1, x2, int((y2 - y1) * width / height), full_w)
    return x1, y1, x2, y2


@dataclass(frozen=True)
class FramedInputs:
    """What the denoising loop runs on and how its results go back over the photo."""

    conditioning: ImageConditioning
    overlay: Overlay | None


def frame_inputs(
    photo: Image.Image,
    mask: Image.Image | None,
    *,
    width: int,
    height: int,
    strength: float,
    keep_unmasked: bool,
    crop_padding: int | None,
) -> FramedInputs:
    """The photo (and mask) resized to width x height, or, with `crop_padding`, their
    region around the mask (`mask_box`) resized to it. The overlay pastes the results back
    (into the full photo when cropped) and keeps the unmasked pixels when asked; None when
    there is nothing to paste (no mask, or neither keeping nor cropping)."""
    rgb = photo.convert("RGB")
    grey = mask.convert("L").resize(rgb.size, RESAMPLE) if mask is not None else None
    box = None
    if grey is not None and crop_padding is not None:
        box = mask_box(np.asarray(grey), width, height, crop_padding)
    region = rgb.crop(box) if box else rgb
    # A writable copy: the loop hands it to torch.from_numpy.
    image = np.array(region.resize((width, height), RESAMPLE))
    mask_array = None
    if grey is not None:
        region_mask = grey.crop(box) if box else grey
        mask_array = np.asarray(region_mask.resize((width, height), RESAMPLE), np.float32) / 255
    conditioning = ImageConditioning(image=image, strength=strength, mask=mask_array)
    if grey is None or not (keep_unmasked or box):
        return FramedInputs(conditioning, None)
    if box:
        overlay = Overlay(np.asarray(rgb), np.asarray(grey), box, keep_unmasked)
    else:
        frame_mask = np.asarray(grey.resize((width, height), RESAMPLE))
        overlay = Overlay(image, frame_mask, None, keep_unmasked)
    return FramedInputs(conditioning, overlay)


def apply_overlay(generated: np.ndarray, overlay: Overlay) -> np.ndarray:
    """`generated` (uint8 [h, w, 3]) put back over the photo: into its box (resized to it)
    when cropped, then, when keeping unmasked pixels, composited through the mask so black
    mask pixels are the photo's exactly and grey ones blend in proportion (as diffusers'
    `apply_overlay` composites)."""
    if overlay.box is not None:
        x1, y1, x2, y2 = overlay.box
        result = overlay.photo.copy()
        patch = Image.fromarray(generated).resize((x2 - x1, y2 - y1), RESAMPLE)
        result[y1:y2, x1:x2] = np.asarray(patch)
    else:
        result = generated
    if not overlay.keep_unmasked:
        return result
    alpha = overlay.mask.astype(np.uint32)[..., None]
    blended = result.astype(np.uint32) * alpha + overlay.photo.astype(np.uint32) * (255 - alpha)
    return ((blended + 127) // 255).astype(np.uint8)
