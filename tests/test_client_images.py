"""Image conditioning in the typed clients: `image` / `mask` inputs, optional fields, refusals.

Requests go to the in-process fake server, which records every GenerateRequest it receives,
so each test checks what actually went over the wire (or that nothing did).
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from test_client_support import FakeKiln, completed, image, png, running_fake_server, started

from kiln_client import MAX_IMAGE_BYTES, AsyncKilnClient, ImageInputError, KilnClient
from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.requests import build_request

PHOTO = png(12, 8)
MASK = png(12, 8, mode="L")


@pytest.fixture
def kiln() -> Iterator[FakeKiln]:
    with running_fake_server() as fake:
        fake.service.script = [image(0, 1, b"out"), completed()]
        yield fake


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def decoded(data: bytes) -> Image.Image:
    picture = Image.open(io.BytesIO(data))
    picture.load()
    return picture


# Each way of holding an input, given the encoded bytes and a scratch folder.
INPUT_KINDS: dict[str, Callable[[bytes, Path], Any]] = {
    "str path": lambda data, tmp: str(write(tmp / "in.png", data)),
    "pathlib.Path": lambda data, tmp: write(tmp / "in.png", data),
    "bytes": lambda data, tmp: data,
    "bytearray": lambda data, tmp: bytearray(data),
    "memoryview": lambda data, tmp: memoryview(data),
    "open file": lambda data, tmp: write(tmp / "in.png", data).open("rb"),
    "BytesIO": lambda data, tmp: io.BytesIO(data),
}


@pytest.mark.parametrize("kind", list(INPUT_KINDS))
def test_every_kind_of_input_arrives_as_the_files_bytes(
    kind: str, kiln: FakeKiln, tmp_path: Path
) -> None:
    (tmp_path / "photo").mkdir()
    (tmp_path / "mask").mkdir()
    photo = INPUT_KINDS[kind](PHOTO, tmp_path / "photo")
    mask = INPUT_KINDS[kind](MASK, tmp_path / "mask")
    with KilnClient(kiln.address) as client:
        client.generate("a red circle", image=photo, mask=mask)
    (sent,) = kiln.service.requests
    assert sent.image == PHOTO
    assert sent.mask == MASK
    for handle in (photo, mask):
        if hasattr(handle, "close"):
            handle.close()


def test_a_file_object_is_read_from_its_current_position(kiln: FakeKiln) -> None:
    handle = io.BytesIO(b"HEADER" + PHOTO)
    handle.seek(len(b"HEADER"))
    with KilnClient(kiln.address) as client:
        client.generate("a red circle", image=handle)
    assert kiln.service.requests[0].image == PHOTO


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16"])
def test_a_pil_image_arrives_as_a_lossless_png(mode: str, kiln: FakeKiln) -> None:
    original = decoded(PHOTO).convert(mode)
    with KilnClient(kiln.address) as client:
        client.generate("a red circle", image=original, mask=decoded(MASK))
    sent = kiln.service.requests[0]
    received = decoded(sent.image)
    assert received.format == "PNG"
    assert received.mode == original.mode
    assert received.tobytes() == original.tobytes()
    assert decoded(sent.mask).tobytes() == decoded(MASK).tobytes()


def test_a_pil_image_opened_from_a_jpeg_is_sent_with_its_decoded_pixels(
    kiln: FakeKiln, tmp_path: Path
) -> None:
    path = tmp_path / "photo.jpg"
    decoded(PHOTO).save(path, format="JPEG", quality=70)
    with Image.open(path) as opened, KilnClient(kiln.address) as client:
        client.generate("a red circle", image=opened)
        expected = opened.tobytes()
    received = decoded(kiln.service.requests[0].image)
    assert received.format == "PNG"  # re-encoded losslessly, not the JPEG file's bytes
    assert received.tobytes() == expected


async def test_async_client_sends_paths_and_pil_images_alike(
    kiln: FakeKiln, tmp_path: Path
) -> None:
    photo = write(tmp_path / "photo.png", PHOTO)
    async with AsyncKilnClient(kiln.address) as client:
        await client.generate("a red circle", image=photo, mask=decoded(MASK), strength=0.5)
        with pytest.raises(ImageInputError, match="no such file"):
            await client.generate("a red circle", image=tmp_path / "missing.png")
    (sent,) = kiln.service.requests
    assert sent.image == PHOTO
    assert decoded(sent.mask).tobytes() == decoded(MASK).tobytes()
    assert sent.strength == pytest.approx(0.5)


# Optional fields: set only when given


def test_image_fields_stay_absent_unless_given() -> None:
    text = build_request("a teapot")
    assert (text.image, text.mask) == (b"", b"")
    for name in ("strength", "keep_unmasked", "mask_crop_padding"):
        assert not text.HasField(name)

    img2img = build_request("a teapot", image=PHOTO)
    assert img2img.image == PHOTO and img2img.mask == b""
    assert not img2img.HasField("strength")  # the server applies the model's default

    inpaint = build_request("a teapot", image=PHOTO, mask=MASK)
    assert not inpaint.HasField("keep_unmasked")  # absent means on
    assert not inpaint.HasField("mask_crop_padding")  # absent means no crop


def test_given_image_fields_are_sent_even_when_falsy(kiln: FakeKiln) -> None:
    with KilnClient(kiln.address) as client:
        client.generate(
            "a teapot",
            image=PHOTO,
            mask=MASK,
            strength=1,
            keep_unmasked=False,
            mask_crop_padding=0,
        )
    sent = kiln.service.requests[0]
    assert sent.HasField("strength") and sent.strength == 1.0
    assert sent.HasField("keep_unmasked") and sent.keep_unmasked is False
    assert sent.HasField("mask_crop_padding") and sent.mask_crop_padding == 0

    explicit = build_request(
        "x", image=PHOTO, mask=MASK, strength=0.3, keep_unmasked=True, mask_crop_padding=32
    )
    assert explicit.strength == pytest.approx(0.3)
    assert (explicit.keep_unmasked, explicit.mask_crop_padding) == (True, 32)


# Refusals before sending


def test_a_missing_file_names_the_argument_and_path(kiln: FakeKiln, tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    photo = write(tmp_path / "photo.png", PHOTO)
    with KilnClient(kiln.address) as client:
        with pytest.raises(ImageInputError) as caught:
            client.generate("x", image=missing)
        assert str(caught.value) == f"image {missing}: no such file"
        assert (caught.value.argument, caught.value.source) == ("image", str(missing))

        with pytest.raises(ImageInputError) as caught:
            client.generate("x", image=photo, mask=str(missing))
        assert str(caught.value) == f"mask {missing}: no such file"
    assert kiln.service.requests == []


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp, "a directory, not an image file"),
        (lambda tmp: write(tmp / "empty.png", b""), "empty; expected PNG, JPEG or WebP data"),
    ],
    ids=["directory", "empty file"],
)
def test_unusable_files_are_refused_naming_the_path(
    make: Callable[[Path], Path], message: str, tmp_path: Path
) -> None:
    path = make(tmp_path)
    with pytest.raises(ImageInputError) as caught:
        build_request("x", image=path)
    assert str(caught.value) == f"image {path}: {message}"


def test_a_file_over_the_limit_is_refused_before_it_is_read(kiln: FakeKiln, tmp_path: Path) -> None:
    assert MAX_IMAGE_BYTES == 20 * 1024 * 1024  # a Kiln server's default max_image_bytes
    big = tmp_path / "huge.png"
    with big.open("wb") as handle:  # sparse: nothing is written
        handle.truncate(MAX_IMAGE_BYTES + 1)
    with KilnClient(kiln.address) as client, pytest.raises(ImageInputError) as caught:
        client.generate("x", image=PHOTO, mask=big)
    message = str(caught.value)
    assert message.startswith(f"mask {big}: too large: 20,971,521 bytes, over the limit of 20 MiB")
    assert "max_image_bytes" in message
    assert kiln.service.requests == []

    with big.open("r+b") as handle:
        handle.truncate(MAX_IMAGE_BYTES)
    assert len(build_request("x", image=PHOTO, mask=big).mask) == MAX_IMAGE_BYTES


@pytest.mark.parametrize(
    "make",
    [lambda data: data, lambda data: io.BytesIO(data)],
    ids=["bytes", "file object"],
)
def test_data_over_the_limit_is_refused_and_the_limit_can_be_raised(
    make: Callable[[bytes], Any],
) -> None:
    data = PHOTO + b"\0" * 1000
    with pytest.raises(ImageInputError, match=r"^image: too large") as caught:
        build_request("x", image=make(data), max_image_bytes=len(data) - 1)
    assert caught.value.argument == "image"
    request = build_request("x", image=make(data), max_image_bytes=len(data))
    assert request.image == data


@pytest.mark.parametrize("strength", [0, 0.0, -0.1, 1.5, 1.0000001, math.nan, math.inf, 1e-46])
def test_strength_outside_zero_to_one_is_refused(strength: float, kiln: FakeKiln) -> None:
    with KilnClient(kiln.address) as client, pytest.raises(ValueError) as caught:
        client.generate("x", image=PHOTO, strength=strength)
    assert str(caught.value).startswith(
        f"strength must be greater than 0 and at most 1; got {strength!r}"
    )
    assert kiln.service.requests == []


@pytest.mark.parametrize("strength", [True, "0.5"])
def test_strength_must_be_a_number(strength: Any) -> None:
    with pytest.raises(ValueError, match=f"strength must be a number; got {strength!r}"):
        build_request("x", image=PHOTO, strength=strength)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mask": MASK}, "mask needs an image"),
        ({"strength": 0.5}, "strength needs an image"),
        ({"image": PHOTO, "keep_unmasked": True}, "keep_unmasked needs a mask"),
        ({"image": PHOTO, "mask_crop_padding": 8}, "mask_crop_padding needs a mask"),
        ({"image": PHOTO, "mask": MASK, "mask_crop_padding": -1}, "mask_crop_padding must be"),
        ({"image": PHOTO, "mask": MASK, "keep_unmasked": 1}, "keep_unmasked must be True or"),
    ],
)
def test_arguments_without_what_they_need_are_refused(
    kwargs: dict[str, Any], message: str, kiln: FakeKiln
) -> None:
    with KilnClient(kiln.address) as client, pytest.raises(ValueError, match=message):
        client.generate("x", **kwargs)
    assert kiln.service.requests == []


def test_a_missing_mask_is_reported_before_a_missing_image_is_read(tmp_path: Path) -> None:
    # The cheap argument check comes first: no file is opened for a request that is wrong.
    with pytest.raises(ValueError, match="mask needs an image"):
        build_request("x", mask=tmp_path / "missing-mask.png")


def test_text_mode_files_wrong_types_and_unstorable_pil_modes_are_refused(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "photo.png", PHOTO)
    with path.open("r", encoding="latin-1") as text, pytest.raises(ImageInputError) as caught:
        build_request("x", image=text)
    assert (
        str(caught.value)
        == f"image {path}: opened in text mode; open the file with open(path, 'rb')"
    )
    with pytest.raises(TypeError, match="image must be a path, bytes, a PIL image or a binary"):
        build_request("x", image=42)  # type: ignore[arg-type]
    with pytest.raises(ImageInputError, match=r"^image: a PIL image in mode CMYK .*convert"):
        build_request("x", image=Image.new("CMYK", (8, 8)))


def test_the_client_needs_no_pil_for_paths_bytes_and_files(tmp_path: Path) -> None:
    photo = write(tmp_path / "photo.png", PHOTO)
    script = f"""
import io, sys
sys.modules["PIL"] = None  # any `import PIL` now fails
from kiln_client import build_request
request = build_request("x", image={str(photo)!r}, mask=io.BytesIO(b"mask-bytes"))
assert request.image == open({str(photo)!r}, "rb").read() and request.mask == b"mask-bytes"
assert build_request("x", image=b"photo-bytes").image == b"photo-bytes"
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ)
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# What the server ran


@pytest.mark.parametrize(
    ("event", "mode", "strength"),
    [
        (started(mode="inpaint", strength=0.8), "inpaint", 0.8),
        (started(mode="image_to_image", strength=0.35), "image_to_image", 0.35),
        (started(mode="text_to_image", strength=0.0), "text_to_image", None),
        (started(), None, None),  # a server that predates image conditioning
    ],
)
def test_result_reports_the_resolved_mode_and_strength(
    event: pb.GenerateResponse, mode: str | None, strength: float | None, kiln: FakeKiln
) -> None:
    kiln.service.script = [event, image(0, 1, b"out"), completed()]
    with KilnClient(kiln.address) as client:
        result = client.generate("x", image=PHOTO)
    assert result.mode == mode
    assert result.strength == strength  # exactly: 0.8, not the float32 0.800000011920929
