"""Request photos: decoding within limits, framing around the mask, and the overlay,
each against what diffusers' VaeImageProcessor does for its `padding_mask_crop`."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from kiln_server.image_inputs import (
    ImageInputError,
    ImageInputLimits,
    apply_overlay,
    decode_image,
    frame_inputs,
    mask_box,
)
from kiln_server.settings import SettingsError, load_settings


def encoded(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_decode_applies_exif_orientation() -> None:
    """A phone photo stored sideways with an EXIF rotation arrives upright."""
    stored = noise_image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    photo = decode_image(encoded(stored, "JPEG", exif=exif), "image", ImageInputLimits())
    assert photo.size == (20, 40)


def test_decode_limits_name_the_field() -> None:
    limits = ImageInputLimits(max_bytes=1000, max_pixels=64 * 64)
    with pytest.raises(ImageInputError, match="limit is 1,000 bytes") as error:
        decode_image(bytes(1001), "mask", limits)
    assert error.value.field == "mask"
    big = encoded(Image.new("L", (65, 64)))
    with pytest.raises(ImageInputError, match=r"65x64 .* limit is 4,096 pixels"):
        decode_image(big, "image", limits)
    with pytest.raises(ImageInputError, match="is a GIF image; send PNG, JPEG or WebP"):
        decode_image(encoded(Image.new("RGB", (8, 8)), "GIF"), "image", limits)


MASKS = {
    "small box": (slice(100, 130), slice(200, 240)),
    "tall strip": (slice(10, 230), slice(150, 160)),
    "at the corner": (slice(0, 12), slice(300, 320)),
    "wide band at the bottom": (slice(220, 240), slice(0, 320)),
}


@pytest.mark.parametrize("region", MASKS.values(), ids=MASKS.keys())
@pytest.mark.parametrize(("width", "height", "padding"), [(64, 64, 8), (96, 64, 0), (64, 128, 32)])
def test_mask_box_frames_as_diffusers(
    region: tuple[slice, slice], width: int, height: int, padding: int
) -> None:
    from diffusers.image_processor import VaeImageProcessor

    mask = np.zeros((240, 320), np.uint8)
    mask[region] = 255
    theirs = VaeImageProcessor.get_crop_region(Image.fromarray(mask), width, height, pad=padding)
    assert mask_box(mask, width, height, padding) == tuple(theirs)


@pytest.mark.parametrize("crop", [None, 8])
def test_overlay_composites_as_diffusers(crop: int | None) -> None:
    """diffusers' apply_overlay: the photo through the inverted mask over the (pasted back)
    result. Equal within one level (PIL's alpha compositing rounds its own way)."""
    from diffusers.image_processor import VaeImageProcessor

    photo = noise_image(160, 120, seed=1)
    mask = np.zeros((120, 160), np.uint8)
    mask[30:70, 50:110] = 255
    mask[70:80, 50:110] = 100  # a soft edge
    framed = frame_inputs(
        photo,
        Image.fromarray(mask),
        width=64 if crop else 160,
        height=64 if crop else 120,
        strength=0.8,
        keep_unmasked=True,
        crop_padding=crop,
    )
    assert framed.overlay is not None
    generated = np.asarray(noise_image(*framed.conditioning.image.shape[1::-1], seed=2))
    ours = apply_overlay(generated, framed.overlay)
    theirs = VaeImageProcessor().apply_overlay(
        Image.fromarray(mask),
        photo,
        Image.fromarray(generated),
        framed.overlay.box,
    )
    difference = np.abs(ours.astype(np.int16) - np.asarray(theirs, np.int16))
    assert difference.max() <= 1
    assert np.array_equal(ours[mask == 0], np.asarray(photo)[mask == 0])


def test_no_overlay_without_a_mask_or_when_not_keeping() -> None:
    photo = noise_image(64, 64)
    plain = frame_inputs(
        photo, None, width=64, height=64, strength=0.5, keep_unmasked=True, crop_padding=None
    )
    assert plain.overlay is None and plain.conditioning.mask is None
    mask = Image.new("L", (64, 64), 255)
    raw = frame_inputs(
        photo, mask, width=64, height=64, strength=0.5, keep_unmasked=False, crop_padding=None
    )
    assert raw.overlay is None and raw.conditioning.mask is not None


def test_message_limit_must_fit_an_image_and_a_mask() -> None:
    with pytest.raises(SettingsError, match="raise it to at least 41"):
        load_settings({"max_message_mb": 40}, environ={})
    settings, _ = load_settings({"max_message_mb": 21, "max_image_mb": 10}, environ={})
    assert settings.max_image_mb == 10


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"max_image_mb": 0}, "max_image_mb must be at least 1"),
        ({"max_image_pixels": 100}, "max_image_pixels at least 4096"),
        ({"max_shape_groups": 0}, "max_shape_groups must be at least 1"),
        ({"engine_stall_seconds": 0.0}, "engine_stall_seconds above 0"),
        ({"max_request_work": -1.0}, "max_request_work must be above 0"),
        ({"metrics_port": 70000}, "metrics_port 70000 is not a port"),
    ],
)
def test_new_server_limits_refuse_bad_values(flags: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(flags, environ={})
