"""Image conditioning end to end: a photo (and mask) over gRPC to the real server.

Bad photos are refused with INVALID_ARGUMENT naming the field before any work, and the
server keeps serving; good ones come back at the photo's size, with the unmasked pixels
exactly the photo's when asked, and cropped to the mask when asked.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from e2e_support import (
    decode,
    expect_error,
    field_violations,
    generate,
    images,
    of_kind,
    open_stub,
    request,
)
from PIL import Image

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.proto.kiln.v1 import generation_service_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def stub(kiln_server: Any) -> Iterator[pb_grpc.GenerationServiceStub]:
    with open_stub(kiln_server.address) as generation_stub:
        yield generation_stub


def photo_array(width: int = 96, height: int = 64) -> np.ndarray:
    """A red disc on a blue-green gradient: uint8 [height, width, 3]."""
    y, x = np.mgrid[0:height, 0:width]
    photo = np.stack([np.full_like(x, 20), 40 + 180 * x // width, 200 - 100 * y // height], -1)
    photo = photo.astype(np.uint8)
    photo[(x - width / 2) ** 2 + (y - height / 2) ** 2 < (height / 4) ** 2] = (220, 30, 40)
    return photo


def encoded(array: np.ndarray, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt)
    return out.getvalue()


def mask_array(width: int = 96, height: int = 64, grey: bool = False) -> np.ndarray:
    """uint8 [height, width]: white (repaint) around a black (keep) centre box; `grey`
    adds a band of 128 (a soft edge)."""
    mask = np.full((height, width), 255, np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 0
    if grey:
        mask[height // 4 - 4 : height // 4, width // 4 : 3 * width // 4] = 128
    return mask


PHOTO = encoded(photo_array())
MASK = encoded(mask_array())


def png_bomb(width: int, height: int) -> bytes:
    """A valid, tiny PNG whose header declares width x height grey pixels (all zero)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    rows = zlib.compress(bytes(width + 1) * height, 9)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


BAD_IMAGES: dict[str, tuple[dict[str, Any], str]] = {
    "undecodable bytes": ({"image": b"not an image at all"}, "image"),
    "truncated PNG": ({"image": PHOTO[: len(PHOTO) // 2]}, "image"),
    "GIF": ({"image": encoded(photo_array(), "GIF")}, "image"),
    "BMP": ({"image": encoded(photo_array(), "BMP")}, "image"),
    "decompression bomb": ({"image": png_bomb(5000, 5000)}, "image"),
    "over the byte limit": ({"image": b"\x89PNG" + bytes(21 * 1024 * 1024)}, "image"),
    "mask without an image": ({"mask": MASK}, "mask"),
    "mask not an image": ({"image": PHOTO, "mask": b"GIF89a garbage"}, "mask"),
    "truncated mask": ({"image": PHOTO, "mask": MASK[:40]}, "mask"),
    "black mask": ({"image": PHOTO, "mask": encoded(np.zeros((64, 96), np.uint8))}, "mask"),
    "strength zero": ({"image": PHOTO, "strength": 0.0}, "strength"),
    "strength above one": ({"image": PHOTO, "strength": 1.5}, "strength"),
    "strength NaN": ({"image": PHOTO, "strength": math.nan}, "strength"),
    "strength leaving no step": (
        {"image": PHOTO, "strength": 0.1, "num_inference_steps": 4},
        "strength",
    ),
    "strength without an image": ({"strength": 0.5}, "strength"),
    "keep_unmasked without a mask": ({"image": PHOTO, "keep_unmasked": True}, "keep_unmasked"),
    "crop padding without a mask": ({"image": PHOTO, "mask_crop_padding": 8}, "mask_crop_padding"),
    "photo smaller than the model": ({"image": encoded(photo_array(24, 24))}, "image"),
    "photo larger than the model": ({"image": encoded(photo_array(600, 64))}, "image"),
}


@pytest.mark.parametrize(("fields", "field"), BAD_IMAGES.values(), ids=BAD_IMAGES.keys())
def test_bad_photo_is_invalid_argument_naming_the_field(
    stub: pb_grpc.GenerationServiceStub, fields: dict[str, Any], field: str
) -> None:
    error = expect_error(lambda: generate(stub, request("a teapot", seed=1, **fields)))
    violations = field_violations(error)
    assert list(violations) == [field], violations
    assert len(error.details()) < 2000 and "Traceback" not in error.details()


def test_server_serves_after_bad_photos(stub: pb_grpc.GenerationServiceStub) -> None:
    for fields, _ in BAD_IMAGES.values():
        with pytest.raises(Exception):  # noqa: B017 - each is refused; the status is above
            generate(stub, request("a teapot", seed=1, **fields))
    events = generate(stub, request("a teapot", seed=1, image=PHOTO, num_inference_steps=4))
    assert len(images(events)) == 1


def test_list_models_reports_image_limits(stub: pb_grpc.GenerationServiceStub) -> None:
    model = stub.ListModels(pb.ListModelsRequest()).models[0]
    assert model.default_strength == pytest.approx(0.8)
    assert model.max_image_bytes == 20 * 1024 * 1024
    assert model.max_image_pixels == 4096 * 4096
    assert not model.inpainting


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_img2img_output_has_the_photos_size(stub: pb_grpc.GenerationServiceStub, fmt: str) -> None:
    message = request("a teapot", seed=3, image=encoded(photo_array(), fmt), num_inference_steps=10)
    events = generate(stub, message)
    started = of_kind(events, "started")[0]
    assert (started.mode, started.width, started.height) == ("image_to_image", 96, 64)
    assert started.strength == pytest.approx(0.8)
    # int(10 x 0.8) steps, from that point of the schedule on.
    assert {p.total_steps for p in of_kind(events, "progress")} == {8}
    assert decode(images(events)[0].data).size == (96, 64)


def test_photo_size_rounds_down_to_the_size_step(stub: pb_grpc.GenerationServiceStub) -> None:
    events = generate(stub, request("a", seed=1, image=encoded(photo_array(101, 70))))
    assert decode(images(events)[0].data).size == (96, 64)


def test_width_and_height_resize_the_photo(stub: pb_grpc.GenerationServiceStub) -> None:
    events = generate(stub, request("a", seed=1, image=PHOTO, width=64, height=64))
    assert decode(images(events)[0].data).size == (64, 64)


def test_inpainting_keeps_unmasked_pixels_exactly(stub: pb_grpc.GenerationServiceStub) -> None:
    message = request(
        "a red circle on a yellow background",
        seed=5,
        num_outputs=2,
        image=PHOTO,
        mask=encoded(mask_array(grey=True)),
    )
    events = generate(stub, message)
    assert of_kind(events, "started")[0].mode == "inpaint"
    photo, mask = photo_array().astype(np.int16), mask_array(grey=True)
    outputs = [np.asarray(decode(event.data), np.int16) for event in images(events)]
    assert [event.seed for event in images(events)] == [5, 6]
    for output in outputs:
        assert output.shape == photo.shape
        assert np.array_equal(output[mask == 0], photo[mask == 0])
        assert np.abs(output[mask == 255] - photo[mask == 255]).max() > 0
    # Grey mask pixels blend the photo and the generated image in proportion (128/255).
    assert not np.array_equal(outputs[0], outputs[1])


def test_keep_unmasked_false_returns_the_raw_result(stub: pb_grpc.GenerationServiceStub) -> None:
    message = request(
        "a red circle", seed=5, image=PHOTO, mask=MASK, keep_unmasked=False, strength=1.0
    )
    output = np.asarray(decode(images(generate(stub, message))[0].data), np.int16)
    kept = mask_array() == 0
    assert np.abs(output[kept] - photo_array().astype(np.int16)[kept]).max() > 0


def test_crop_to_mask_generates_only_around_the_mask(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """A small repaint area in a large photo: generated at width x height around the mask,
    pasted back; everything outside the crop box is the photo's, pixel for pixel."""
    big = photo_array(320, 240)
    mask = np.zeros((240, 320), np.uint8)
    mask[100:130, 200:240] = 255
    message = request(
        "a yellow square",
        seed=6,
        image=encoded(big),
        mask=encoded(mask),
        mask_crop_padding=8,
        width=64,
        height=64,
    )
    events = generate(stub, message)
    started = of_kind(events, "started")[0]
    assert (started.width, started.height) == (64, 64)
    output = np.asarray(decode(images(events)[0].data), np.int16)
    assert output.shape == big.shape
    # The box: rows 92-138 and columns 192-248 grown to a square 56 x 56 around them.
    outside = np.ones((240, 320), bool)
    outside[80:150, 180:260] = False
    assert np.array_equal(output[outside], big.astype(np.int16)[outside])
    assert np.abs(output[100:130, 200:240] - big[100:130, 200:240]).max() > 0


def test_readme_product_photo_flow(kiln_server: Any, tmp_path: Any) -> None:
    """README's "Product photos" flow with the Python client: one request, five
    variations at the photo's size, each with the product's pixels kept exactly."""
    from kiln_client.client import KilnClient

    (tmp_path / "product.png").write_bytes(PHOTO)
    (tmp_path / "background-mask.png").write_bytes(MASK)
    with KilnClient(kiln_server.address) as kiln:
        result = kiln.generate(
            "a red circle on a yellow background",
            image=tmp_path / "product.png",
            mask=str(tmp_path / "background-mask.png"),
            num_outputs=5,
            seed=1234,
        )
    assert result.mode == "inpaint"
    assert [image.seed for image in result.images] == [1234 + i for i in range(5)]
    keep = mask_array() == 0
    variations = []
    for image in result.images:
        pixels = np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB"))
        assert pixels.shape == (64, 96, 3)
        assert np.array_equal(pixels[keep], photo_array()[keep])
        variations.append(pixels)
    assert len({pixels.tobytes() for pixels in variations}) == 5
