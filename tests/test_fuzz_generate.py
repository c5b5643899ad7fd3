"""Property tests over every GenerateRequest field, against the real server.

Hypothesis builds requests from every field of GenerateRequest, in three families: every
field valid (it must generate), valid but for one field (it must be refused naming exactly
that field, or NOT_FOUND for the model), and anything at all; and raw byte strings the
typed stubs could never send (malformed protobuf, invalid UTF-8 in string fields, unknown
fields, overlong varints). Whatever arrives, the call must end in one of two ways:

- a complete stream: queued... started, progress 1..total, one image per output (each
  decoding to the size started reported), completed counting them; or
- a well-formed status: INVALID_ARGUMENT carrying google.rpc.BadRequest whose violations
  name real GenerateRequest field paths (each once, every field known to be wrong among
  them), NOT_FOUND for an unknown model, or RESOURCE_EXHAUSTED with RetryInfo; with a
  message under 2 KB and no traceback text.

Malformed protobuf also gets exactly one warning in the server's log and no traceback, and
after all of it the health service still says SERVING. Valid requests are kept cheap
(small sizes, few steps and outputs) so the module fits CI; `KILN_FUZZ_EXAMPLES` raises
the number of examples per property for a longer local run. Examples are derandomized:
CI runs the same ones every time.
"""

from __future__ import annotations

import io
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from e2e_support import (
    CHANNEL_OPTIONS,
    decode,
    generate,
    kinds,
    log_records,
    of_kind,
    open_stub,
    request,
)
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.proto.kiln.v1 import generation_service_pb2_grpc as pb_grpc
from kiln_server.pipeline.schedulers import scheduler_names

EXAMPLES = int(os.environ.get("KILN_FUZZ_EXAMPLES", "50"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CALL_TIMEOUT = 60.0  # a hang fails as DEADLINE_EXCEEDED, which no property allows
MAX_DETAILS = 2048  # a status message or violation description longer than this echoes input
GENERATE_METHOD = "/kiln.v1.GenerationService/Generate"

# The tiny model the session server serves (tests/conftest.py).
MODEL = "tiny"
MIN_SIZE, MAX_SIZE, SIZE_MULTIPLE = 32, 512, 8
MAX_STEPS, MAX_OUTPUTS, MAX_GUIDANCE = 150, 8, 50.0
MAX_PROMPT_CHARS = 4096
DEFAULT_SIZE = 64
DEFAULT_STEPS = 8
DEFAULT_STRENGTH = 0.8
MIME_TYPES = {0: "image/png", 1: "image/png", 2: "image/jpeg", 3: "image/webp"}
LONG_PROMPT = " ".join(["cat"] * 80)  # over the 77-token limit


def field_paths(descriptor: Descriptor, prefix: str = "") -> set[str]:
    """Every field path of a message: `name`, and `parent.child` for nested messages."""
    paths = set()
    for field in descriptor.fields:
        path = prefix + field.name
        paths.add(path)
        if field.message_type is not None:
            paths |= field_paths(field.message_type, path + ".")
    return paths


FIELD_PATHS = field_paths(pb.GenerateRequest.DESCRIPTOR)
STRING_FIELDS = {
    field.name: field.number
    for field in pb.GenerateRequest.DESCRIPTOR.fields
    if field.type == FieldDescriptor.TYPE_STRING
}


@pytest.fixture(scope="module")
def stub(kiln_server: Any) -> Iterator[pb_grpc.GenerationServiceStub]:
    with open_stub(kiln_server.address) as generation_stub:
        yield generation_stub


@pytest.fixture(scope="module")
def raw_generate(kiln_server: Any) -> Iterator[Any]:
    """Generate taking the request as raw bytes: what no typed stub can send."""
    with grpc.insecure_channel(kiln_server.address, options=CHANNEL_OPTIONS) as channel:
        yield channel.unary_stream(
            GENERATE_METHOD,
            request_serializer=lambda data: data,
            response_deserializer=pb.GenerateResponse.FromString,
        )


# --- images for the conditioning fields ----------------------------------------------------


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def gradient(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width, 1), y * 255 // max(height, 1), (x + y) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def box_mask(width: int, height: int) -> Image.Image:
    """White (repaint) box in the middle of black (keep)."""
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4 + 1, width // 4 : 3 * width // 4 + 1] = 255
    return Image.fromarray(mask)


def with_exif_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", exif=exif.tobytes())


def pixel_mask(width: int, height: int, x: int, y: int) -> Image.Image:
    """Black but for one white pixel: the smallest region to repaint."""
    mask = Image.new("L", (width, height), 0)
    mask.putpixel((x, y), 255)
    return mask


def animated_png() -> bytes:
    frames = [gradient(64, 64), gradient(64, 64).rotate(90)]
    return encode(frames[0], "PNG", save_all=True, append_images=frames[1:])


GREY16_PHOTO = encode(gradient(64, 64).convert("I;16"), "PNG")
BAD_EXIF_PHOTO = with_exif_orientation(gradient(64, 64), 9)  # an orientation EXIF lacks
# Photos valid alone (their size, rounded down to multiples of 8, is servable).
PHOTOS_ANY_SIZE = [
    encode(gradient(64, 64), "PNG"),
    encode(gradient(72, 40), "JPEG"),
    encode(gradient(48, 48), "WEBP"),
    encode(gradient(64, 64).convert("RGBA"), "PNG"),
    encode(gradient(64, 64).convert("LA"), "PNG"),
    encode(gradient(64, 64).convert("L"), "PNG"),
    encode(gradient(64, 64).convert("P"), "PNG"),
    encode(gradient(64, 64).convert("1"), "PNG"),
    GREY16_PHOTO,
    encode(gradient(64, 64).convert("CMYK"), "JPEG"),
    encode(gradient(64, 64), "JPEG", progressive=True),
    encode(gradient(64, 64).convert("RGBA"), "WEBP", lossless=True),
    animated_png(),
    with_exif_orientation(gradient(40, 72), 6),  # stored 40x72, upright 72x40
    BAD_EXIF_PHOTO,
    encode(gradient(33, 47), "PNG"),  # rounds down to 32x40
    encode(gradient(512, 32), "PNG"),  # the model's extremes
]
# Photos valid only with width and height given (then resized to them).
PHOTOS_SIZED_ONLY = [
    encode(gradient(1, 1), "PNG"),  # smaller than the model serves
    encode(gradient(600, 40), "PNG"),  # wider than the model serves
]
PHOTOS = PHOTOS_ANY_SIZE + PHOTOS_SIZED_ONLY
GREY_MASK = encode(Image.new("L", (64, 64), 128), "PNG")  # a soft mask everywhere
VALID_MASKS = [
    encode(box_mask(64, 64), "PNG"),
    encode(box_mask(72, 40), "JPEG"),
    encode(box_mask(64, 64).convert("RGB"), "WEBP"),
    encode(box_mask(64, 64).convert("RGBA"), "PNG"),
    encode(box_mask(64, 64).convert("1"), "PNG"),
    encode(box_mask(64, 64).convert("P"), "PNG"),
    encode(box_mask(512, 32), "PNG"),  # another shape than the photo: resized to it
    encode(Image.new("L", (1, 1), 255), "PNG"),
    encode(pixel_mask(64, 64, 0, 0), "PNG"),  # one pixel in a corner
    encode(pixel_mask(64, 64, 63, 63), "PNG"),
    encode(pixel_mask(64, 64, 31, 0), "PNG"),
    GREY_MASK,
]
BLACK_MASK = encode(Image.new("L", (64, 64), 0), "PNG")  # nothing to repaint
MASKS = [*VALID_MASKS, BLACK_MASK]
UNREADABLE = [
    b"",
    b"not an image",
    b"\x89PNG\r\n\x1a\n",
    b"GIF89a" + bytes(20),
    encode(gradient(8, 8), "GIF"),
    encode(gradient(8, 8), "BMP"),
    encode(gradient(8, 8), "TIFF"),
    PHOTOS[0][: len(PHOTOS[0]) // 2],
    PHOTOS[1][:200],
    PHOTOS[2][:-10],
]


def mutated(originals: list[bytes]) -> st.SearchStrategy[bytes]:
    """Valid encodings truncated or with a few bytes overwritten somewhere."""

    def truncate(data: bytes, at: int) -> bytes:
        return data[: at % len(data)]

    def overwrite(data: bytes, at: int, patch: bytes) -> bytes:
        at %= len(data)
        return data[:at] + patch + data[at + len(patch) :]

    source = st.sampled_from(originals)
    position = st.integers(0, 1 << 16)
    return st.one_of(
        st.builds(truncate, source, position),
        st.builds(overwrite, source, position, st.binary(min_size=1, max_size=8)),
    )


# --- strategies over every field -----------------------------------------------------------
#
# Each field has values the model accepts (kept cheap to generate), values it must refuse
# whatever the other fields say, and arbitrary values. Requests come in three families:
# every field valid (must generate), valid but for one field (must be refused naming that
# field, or NOT_FOUND for the model), and anything at all (the general property, with a
# partial oracle of fields known to be wrong).

U32 = 2**32 - 1
NON_FINITE = [math.nan, math.inf, -math.inf]


def absent_or(*strategies: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """None (field left unset; shrinks there first) or a value of one of `strategies`."""
    return st.one_of(st.none(), *strategies)


def is_valid_size(value: int) -> bool:
    return value % SIZE_MULTIPLE == 0 and MIN_SIZE <= value <= MAX_SIZE


# Photos valid alone, and photos valid only with width and height given (resized to them).
# Short enough that even 4-byte characters stay within 77 tokens (byte-level BPE).
SHORT_TEXT = st.text(max_size=15)

VALID: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["", MODEL]),
    "prompt": st.one_of(
        st.sampled_from(["a teapot on marble", "a red circle on a blue background"]),
        st.sampled_from(["🫖" * 15, "a\u202eb", "x\x00y", "TEAPOT!!!", " padded "]),
        SHORT_TEXT.filter(lambda text: bool(text.strip())),
    ),
    "negative_prompt": st.one_of(st.sampled_from(["blurry", "\x00", "   "]), SHORT_TEXT),
    "width": st.integers(MIN_SIZE // SIZE_MULTIPLE, 16).map(lambda k: k * SIZE_MULTIPLE),
    "height": st.integers(MIN_SIZE // SIZE_MULTIPLE, 16).map(lambda k: k * SIZE_MULTIPLE),
    "num_outputs": st.integers(0, 3),
    "num_inference_steps": st.integers(0, 4),
    "guidance_scale": st.one_of(
        st.sampled_from([0.0, -0.0, 1.0, 1.5, 7.5, MAX_GUIDANCE, 1e-45]),
        st.floats(0.0, MAX_GUIDANCE, width=32),
    ),
    "scheduler": st.sampled_from(["", *scheduler_names()]),
    "seed": st.one_of(
        st.sampled_from([0, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 3, 2**64 - 1]),
        st.integers(0, 2**64 - 1),
    ),
    "output_format": st.integers(0, 3),
    "output_quality": st.integers(0, 100),
    "priority": st.integers(0, 3),
    "preview.every_n_steps": st.one_of(st.integers(0, 3), st.integers(0, U32)),
    "preview.max_size": st.one_of(st.just(0), st.integers(16, 1024)),
    "preview.format": st.integers(0, 2),
    "preview.quality": st.integers(0, 100),
    "preview.method": st.integers(0, 1),  # 2 (decoder) depends on the model
    "strength": st.one_of(st.sampled_from([0.3, 0.5, 0.8, 1.0]), st.floats(0.25, 1.0, width=32)),
    "keep_unmasked": st.booleans(),
    "mask_crop_padding": st.one_of(st.sampled_from([0, 8, 64, 4096]), st.integers(0, 4096)),
}
# Values refused whatever the other (valid) fields are.
INVALID: dict[str, st.SearchStrategy[Any]] = {
    "model": st.one_of(
        st.sampled_from(
            ["TINY", "tiny ", "stability-ai/sdxl", "模型", "tiny\x00", "../../etc", "é" * 3000]
        ),
        st.just("m" * 100_000),
        st.text(max_size=40).filter(lambda name: name not in ("", MODEL)),
    ),
    "prompt": st.sampled_from(["", "   ", "\t\n", "\u3000", LONG_PROMPT, "x" * 5000]),
    "negative_prompt": st.sampled_from([LONG_PROMPT, "x" * 5000, "🫖" * 30]),
    "width": st.one_of(
        st.sampled_from([1, 7, 8, 16, 24, 31, 33, 65, 513, 520, 4096, 2**31, U32]),
        st.integers(1, U32).filter(lambda v: not is_valid_size(v)),
    ),
    "height": st.one_of(
        st.sampled_from([1, 7, 8, 16, 24, 31, 33, 65, 513, 520, 4096, 2**31, U32]),
        st.integers(1, U32).filter(lambda v: not is_valid_size(v)),
    ),
    "num_outputs": st.one_of(st.sampled_from([9, 64, U32]), st.integers(9, U32)),
    "num_inference_steps": st.one_of(st.sampled_from([151, 1000, U32]), st.integers(151, U32)),
    "guidance_scale": st.one_of(
        st.sampled_from([*NON_FINITE, -0.5, -1e-45, 50.5, 1e6, 3.4e38]),
        st.floats(width=32).filter(lambda g: not 0.0 <= g <= MAX_GUIDANCE),
    ),
    "scheduler": st.one_of(
        st.sampled_from(["K_LMS", "k_euler", "K_EULER ", "DDIM\x00", "s" * 10_000]),
        st.text(min_size=1, max_size=30).filter(lambda name: name not in scheduler_names()),
    ),
    "output_format": st.integers(-(2**31), 2**31 - 1).filter(lambda v: v not in range(4)),
    "output_quality": st.one_of(st.sampled_from([101, U32]), st.integers(101, U32)),
    "priority": st.integers(-(2**31), 2**31 - 1).filter(lambda v: v not in range(4)),
    "preview.max_size": st.one_of(st.integers(1, 15), st.integers(1025, U32)),
    "preview.format": st.integers(-(2**31), 2**31 - 1).filter(lambda v: v not in range(3)),
    "preview.quality": st.integers(101, U32),
    "preview.method": st.integers(-(2**31), 2**31 - 1).filter(lambda v: v not in range(3)),
    "image": st.sampled_from([data for data in UNREADABLE if data]),
    "mask": st.sampled_from([BLACK_MASK, *(data for data in UNREADABLE if data)]),
    "strength": st.one_of(
        st.sampled_from([*NON_FINITE, 0.0, -0.0, 1.0000001, 2.0, -1.0]),
        st.floats(width=32).filter(lambda s: not 0.0 < s <= 1.0),
    ),
    "mask_crop_padding": st.integers(4097, U32),
}
# Anything at all, valid or not, including what neither list holds.
ANYTHING: dict[str, st.SearchStrategy[Any]] = {
    # Mostly a served model: an unknown one ends validation before the other fields.
    "model": st.one_of(VALID["model"], VALID["model"], VALID["model"], INVALID["model"]),
    "prompt": st.one_of(VALID["prompt"], INVALID["prompt"], st.text(max_size=120)),
    "negative_prompt": st.one_of(
        VALID["negative_prompt"], INVALID["negative_prompt"], st.text(max_size=120)
    ),
    "width": st.one_of(VALID["width"], INVALID["width"]),
    "height": st.one_of(VALID["height"], INVALID["height"]),
    "num_outputs": st.one_of(VALID["num_outputs"], INVALID["num_outputs"]),
    "num_inference_steps": st.one_of(VALID["num_inference_steps"], INVALID["num_inference_steps"]),
    "guidance_scale": st.floats(width=32),
    "scheduler": st.one_of(VALID["scheduler"], INVALID["scheduler"]),
    "seed": VALID["seed"],
    "output_format": st.integers(-(2**31), 2**31 - 1),
    "output_quality": st.integers(0, U32),
    "priority": st.integers(-(2**31), 2**31 - 1),
    "preview.every_n_steps": st.integers(0, U32),
    "preview.max_size": st.integers(0, U32),
    "preview.format": st.integers(-(2**31), 2**31 - 1),
    "preview.quality": st.integers(0, U32),
    "preview.method": st.integers(-(2**31), 2**31 - 1),
    "image": st.one_of(
        st.sampled_from(PHOTOS), st.sampled_from(UNREADABLE), mutated(PHOTOS[:3]), st.binary()
    ),
    "mask": st.one_of(
        st.sampled_from(MASKS), st.sampled_from(UNREADABLE), mutated(MASKS[:3]), st.binary()
    ),
    "strength": st.floats(width=32),
    "keep_unmasked": st.booleans(),
    "mask_crop_padding": st.integers(0, U32),
    # The served model has no LoRA folders, so any `loras` is refused naming `loras`.
    "loras.name": st.one_of(
        st.sampled_from(["ink", "../x", "a/b", "/etc/passwd", "..", ""]), st.text(max_size=40)
    ),
    "loras.scale": st.floats(width=32),
}


def set_field(message: pb.GenerateRequest, path: str, value: Any) -> None:
    """Set `path` (a field, `preview.field` or `loras.field` of one entry) to `value`."""
    *parents, name = path.split(".")
    target: Any = message
    for parent in parents:
        target = getattr(target, parent)
        if parent == "loras":
            target = target[0] if len(target) else target.add()
    setattr(target, name, value)


@st.composite
def valid_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    """A request every field of which the tiny model accepts (and generates quickly)."""
    message = pb.GenerateRequest(prompt=draw(VALID["prompt"]))
    conditioning = ("image", "mask", "strength", "keep_unmasked", "mask_crop_padding")
    for path, strategy in VALID.items():
        if path not in (*conditioning, "prompt"):
            value = draw(absent_or(strategy))
            if value is not None:
                set_field(message, path, value)
    mode = draw(st.sampled_from(["text", "image", "inpaint"]))
    if mode != "text":
        message.image = draw(st.sampled_from(PHOTOS_ANY_SIZE + PHOTOS_SIZED_ONLY))
        if message.image in PHOTOS_SIZED_ONLY:
            message.width = message.width or DEFAULT_SIZE
            message.height = message.height or DEFAULT_SIZE
        optional = ["strength"]
        if mode == "inpaint":
            message.mask = draw(st.sampled_from(VALID_MASKS))
            optional += ["keep_unmasked", "mask_crop_padding"]
        for path in optional:
            value = draw(absent_or(VALID[path]))
            if value is not None:
                set_field(message, path, value)
        steps = message.num_inference_steps or DEFAULT_STEPS
        strength = message.strength if message.HasField("strength") else DEFAULT_STRENGTH
        if int(steps * strength) < 1:  # would leave no denoising step
            message.strength = 1.0
    if message.HasField("seed"):  # image i uses seed + i, which must stay below 2^64
        message.seed = min(message.seed, 2**64 - max(message.num_outputs, 1))
    return message


@st.composite
def one_bad_field_requests(draw: st.DrawFn) -> tuple[pb.GenerateRequest, str]:
    """A valid request with one field set to a value refused whatever the others are."""
    message = draw(valid_requests())
    path = draw(st.sampled_from(sorted(INVALID)))
    set_field(message, path, draw(INVALID[path]))
    if path == "image":  # a text request's steps x the default strength may leave none
        steps = message.num_inference_steps or DEFAULT_STEPS
        if not message.HasField("strength") and int(steps * DEFAULT_STRENGTH) < 1:
            message.strength = 1.0
    return message, path


@st.composite
def any_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    """Every field absent or anything at all."""
    message = pb.GenerateRequest()
    for path, strategy in ANYTHING.items():
        value = draw(absent_or(strategy))
        if value is not None:
            set_field(message, path, value)
    return message


# --- the property --------------------------------------------------------------------------


@dataclass
class Outcome:
    """How one Generate call ended: its events, and the error status if it failed."""

    events: list[pb.GenerateResponse]
    error: grpc.RpcError | None


def call(stream: Any) -> Outcome:
    """Drain a Generate call."""
    events: list[pb.GenerateResponse] = []
    try:
        for event in stream:
            events.append(event)
    except grpc.RpcError as error:
        return Outcome(events, error)
    return Outcome(events, None)


def fields_known_bad(message: pb.GenerateRequest) -> set[str]:
    """Fields this request gets wrong whatever its other fields say (a partial oracle)."""
    bad = set()
    if not message.prompt.strip() or len(message.prompt) > MAX_PROMPT_CHARS:
        bad.add("prompt")
    if len(message.negative_prompt) > MAX_PROMPT_CHARS:
        bad.add("negative_prompt")
    if not message.image:
        needing_an_image = {
            "mask": bool(message.mask),
            "strength": message.HasField("strength"),
            "keep_unmasked": message.HasField("keep_unmasked"),
            "mask_crop_padding": message.HasField("mask_crop_padding"),
        }
        bad |= {name for name, given in needing_an_image.items() if given}
        for axis in ("width", "height"):
            value = getattr(message, axis)
            if value and not is_valid_size(value):
                bad.add(axis)
    if message.num_inference_steps > MAX_STEPS:
        bad.add("num_inference_steps")
    if message.num_outputs > MAX_OUTPUTS:
        bad.add("num_outputs")
    if message.HasField("guidance_scale"):
        guidance = message.guidance_scale
        if not (math.isfinite(guidance) and 0.0 <= guidance <= MAX_GUIDANCE):
            bad.add("guidance_scale")
    if message.scheduler and message.scheduler not in scheduler_names():
        bad.add("scheduler")
    if message.output_format not in (0, 1, 2, 3):
        bad.add("output_format")
    if message.output_quality > 100:
        bad.add("output_quality")
    if message.priority not in (0, 1, 2, 3):
        bad.add("priority")
    preview = message.preview
    if preview.format not in (0, 1, 2):
        bad.add("preview.format")
    if preview.method not in (0, 1, 2):
        bad.add("preview.method")
    if preview.quality > 100:
        bad.add("preview.quality")
    if preview.max_size and not 16 <= preview.max_size <= 1024:
        bad.add("preview.max_size")
    if message.loras:  # the served model has no LoRA folders
        bad.add("loras")
    outputs = max(message.num_outputs, 1)
    if message.HasField("seed") and outputs <= MAX_OUTPUTS and message.seed + outputs > 2**64:
        bad.add("seed")
    return bad


def status_problems(error: grpc.RpcError) -> list[str]:
    """What is wrong with an error status, whatever the request was."""
    problems = []
    code = error.code()
    text = error.details() or ""
    if code not in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ):
        problems.append(f"status {code.name}: {text[:300]!r}")
    if len(text) >= MAX_DETAILS:
        problems.append(f"{code.name} message is {len(text)} characters (echoes input uncut)")
    if "Traceback" in text:
        problems.append(f"{code.name} message carries a traceback: {text[:300]!r}")
    try:
        status = rpc_status.from_call(error)
    except ValueError as mismatch:
        return [*problems, f"rich status disagrees with the call's: {mismatch}"]
    details = list(status.details) if status is not None else []
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not any(
        packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for packed in details
    ):
        problems.append(f"RESOURCE_EXHAUSTED without RetryInfo: {text[:300]!r}")
    return problems


def violations_of(error: grpc.RpcError) -> list[error_details_pb2.BadRequest.FieldViolation]:
    """The BadRequest field violations of a status (empty when it carries none)."""
    status = rpc_status.from_call(error)
    found = []
    for packed in status.details if status is not None else []:
        if packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            packed.Unpack(bad_request)
            found.extend(bad_request.field_violations)
    return found


def violation_problems(
    violations: list[error_details_pb2.BadRequest.FieldViolation], *also_allowed: str
) -> list[str]:
    """What is wrong with INVALID_ARGUMENT's field violations: each must name a real field
    path (or one of `also_allowed`), once, with a short description."""
    if not violations:
        return ["INVALID_ARGUMENT without google.rpc.BadRequest field violations"]
    problems = []
    names = [v.field for v in violations]
    known = FIELD_PATHS | set(also_allowed)
    unknown = {name for name in names if re.sub(r"\[\d+\]", "", name) not in known}
    if unknown:
        problems.append(f"violations name fields GenerateRequest lacks: {sorted(unknown)}")
    if len(names) != len(set(names)):
        problems.append(f"a field is named twice: {names}")
    for violation in violations:
        if not violation.description:
            problems.append(f"violation of {violation.field} has no description")
        if len(violation.description) >= MAX_DETAILS:
            problems.append(
                f"violation of {violation.field} is {len(violation.description)} characters"
            )
    return problems


def stream_problems(message: pb.GenerateRequest, events: list[pb.GenerateResponse]) -> list[str]:
    """What is wrong with a stream that ended OK."""
    sequence = kinds(events)
    compact = re.sub(r"(\w+)(,\1)+", r"\1+", ",".join(sequence))
    expected = max(message.num_outputs, 1)
    if not re.fullmatch(
        rf"(queued,)+started(,progress)+(,image){{{expected}}},completed", ",".join(sequence)
    ):
        return [f"events {compact}, expected queued+ started progress+ image x{expected} completed"]
    problems = []
    if len({event.request_id for event in events}) != 1 or not events[0].request_id:
        problems.append("request_id missing or changing within the stream")
    (started,) = of_kind(events, "started")
    if started.model != MODEL:
        problems.append(f"started.model {started.model!r}")
    for axis in ("width", "height"):
        asked = getattr(message, axis)
        if asked and getattr(started, axis) != asked:
            problems.append(f"started.{axis} {getattr(started, axis)}, asked {asked}")
    if message.HasField("seed") and started.seed != message.seed:
        problems.append(f"started.seed {started.seed}, asked {message.seed}")
    progress = of_kind(events, "progress")
    total = progress[0].total_steps
    if [p.step for p in progress] != list(range(1, total + 1)) or any(
        p.total_steps != total for p in progress
    ):
        problems.append(f"progress steps {[(p.step, p.total_steps) for p in progress]}")
    for p in progress:
        if p.preview:
            preview = decode(p.preview)
            if (preview.width, preview.height) != (p.preview_width, p.preview_height):
                problems.append(f"preview is {preview.size}, reported {p.preview_width}")
    image_events = of_kind(events, "image")
    if [image.index for image in image_events] != list(range(expected)):
        problems.append(f"image indexes {[image.index for image in image_events]}")
    for image in image_events:
        if image.seed != started.seed + image.index:
            problems.append(f"image {image.index} has seed {image.seed}")
        if image.mime_type != MIME_TYPES[message.output_format]:
            problems.append(f"image {image.index} is {image.mime_type}")
        size = decode(image.data).size
        if size != (image.width, image.height):
            problems.append(f"image {image.index} decodes to {size}, reports {image.width}")
        if not message.HasField("mask_crop_padding") and size != (started.width, started.height):
            problems.append(f"image {image.index} is {size}, started said {started.width}")
    (completed,) = of_kind(events, "completed")
    if completed.num_images != expected:
        problems.append(f"completed.num_images {completed.num_images}, expected {expected}")
    return problems


def outcome_problems(message: pb.GenerateRequest, outcome: Outcome) -> list[str]:
    """Everything wrong with how the server answered `message` (empty: all is well)."""
    known_model = message.model in ("", MODEL)
    bad = fields_known_bad(message) if known_model else set()
    if outcome.error is None:
        problems = stream_problems(message, outcome.events)
        if not known_model:
            problems.append(f"unknown model {message.model[:40]!r} generated images")
        if bad:
            problems.append(f"succeeded although {sorted(bad)} are invalid")
        return problems
    error = outcome.error
    problems = status_problems(error)
    code = error.code()
    if not known_model and code != grpc.StatusCode.NOT_FOUND:
        problems.append(f"unknown model {message.model[:40]!r} got {code.name}, not NOT_FOUND")
    if bad and code != grpc.StatusCode.INVALID_ARGUMENT:
        problems.append(f"{sorted(bad)} are invalid, got {code.name}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        violations = violations_of(error)
        problems += violation_problems(violations)
        missing = bad - {v.field for v in violations}
        if missing and violations:
            problems.append(
                f"invalid {sorted(missing)} not named in {[v.field for v in violations]}"
            )
    if code == grpc.StatusCode.NOT_FOUND and known_model:
        problems.append(f"NOT_FOUND for model {message.model!r}: {error.details()[:200]!r}")
    if any(event.WhichOneof("event") in ("image", "completed") for event in outcome.events):
        problems.append(f"{code.name} after images or completion")
    return problems


def describe(message: pb.GenerateRequest) -> str:
    """The request, with long byte and text fields abbreviated."""
    shown = pb.GenerateRequest()
    shown.CopyFrom(message)
    for name in ("image", "mask"):
        data = getattr(shown, name)
        if len(data) > 40:
            setattr(shown, name, data[:40] + f"...({len(data)} bytes)".encode())
    for name in STRING_FIELDS:
        text = getattr(shown, name)
        if len(text) > 80:
            setattr(shown, name, text[:80] + f"...({len(text)} characters)")
    return str(shown).replace("\n", " ")


def assert_well_handled(message: pb.GenerateRequest, outcome: Outcome) -> None:
    problems = outcome_problems(message, outcome)
    assert not problems, f"request {describe(message)}:\n  " + "\n  ".join(problems)


# --- the tests -----------------------------------------------------------------------------


# Every scalar field path; a message field (preview) is covered through its own fields.
LEAF_PATHS = FIELD_PATHS - {
    field.name for field in pb.GenerateRequest.DESCRIPTOR.fields if field.message_type
}


def test_the_fuzzer_covers_every_request_field() -> None:
    """A field added to GenerateRequest must get a strategy here too."""
    assert set(ANYTHING) == LEAF_PATHS
    assert set(VALID) <= LEAF_PATHS and set(INVALID) <= LEAF_PATHS


def test_the_fuzzer_knows_the_served_limits(stub: pb_grpc.GenerationServiceStub) -> None:
    """The oracle's constants are the tiny model's limits as ListModels reports them."""
    reply = stub.ListModels(pb.ListModelsRequest(), timeout=30)
    assert reply.default_model == MODEL
    (model,) = reply.models
    assert (model.min_size, model.max_size, model.size_multiple) == (
        MIN_SIZE,
        MAX_SIZE,
        SIZE_MULTIPLE,
    )
    assert (model.default_width, model.default_num_inference_steps) == (
        DEFAULT_SIZE,
        DEFAULT_STEPS,
    )
    assert (model.max_num_inference_steps, model.max_num_outputs) == (MAX_STEPS, MAX_OUTPUTS)
    assert model.max_guidance_scale == MAX_GUIDANCE
    assert model.default_strength == pytest.approx(DEFAULT_STRENGTH)
    assert list(model.schedulers) == scheduler_names()


@FUZZ
@given(message=valid_requests())
@example(message=request(image=GREY16_PHOTO, seed=1, num_inference_steps=2))
@example(message=request(image=BAD_EXIF_PHOTO, seed=1, num_inference_steps=2))
@example(message=request(image=PHOTOS[0], mask=GREY_MASK, seed=1, num_inference_steps=2))
@example(message=request(seed=2**64 - 1, guidance_scale=1e-45, num_inference_steps=1))
def test_valid_requests_generate(
    stub: pb_grpc.GenerationServiceStub, message: pb.GenerateRequest
) -> None:
    outcome = call(stub.Generate(message, timeout=CALL_TIMEOUT))
    problems = outcome_problems(message, outcome)
    if outcome.error is not None:
        problems.insert(0, "a valid request was refused")
    assert not problems, f"request {describe(message)}:\n  " + "\n  ".join(problems)


@FUZZ
@given(case=one_bad_field_requests())
@example(case=(request(strength=math.nan, seed=1), "strength"))
@example(case=(request(model="m" * 100_000), "model"))
@example(case=(request(scheduler="s" * 10_000), "scheduler"))
def test_one_bad_field_is_refused_naming_it(
    stub: pb_grpc.GenerationServiceStub, case: tuple[pb.GenerateRequest, str]
) -> None:
    message, path = case
    outcome = call(stub.Generate(message, timeout=CALL_TIMEOUT))
    problems = outcome_problems(message, outcome)
    expected = grpc.StatusCode.NOT_FOUND if path == "model" else grpc.StatusCode.INVALID_ARGUMENT
    if outcome.error is None or outcome.error.code() != expected:
        problems.insert(0, f"bad {path} did not end in {expected.name}")
    elif expected == grpc.StatusCode.INVALID_ARGUMENT:
        named = {v.field for v in violations_of(outcome.error)}
        # An absurd output count also overflows a seed near 2^64; naming both is right.
        allowed = {path, "seed"} if path == "num_outputs" else {path}
        if path not in named or not named <= allowed:
            problems.append(f"only {path} is wrong, the violations name {sorted(named)}")
    assert not problems, f"request {describe(message)}:\n  " + "\n  ".join(problems)


@FUZZ
@given(message=any_requests())
def test_any_request_ends_in_images_or_a_precise_status(
    stub: pb_grpc.GenerationServiceStub, message: pb.GenerateRequest
) -> None:
    outcome = call(stub.Generate(message, timeout=CALL_TIMEOUT))
    assert_well_handled(message, outcome)


# Raw messages: encodings the typed stubs never produce.


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def length_delimited(number: int, payload: bytes) -> bytes:
    return tag(number, 2) + varint(len(payload)) + payload


CHEAP_PREFIX = request(seed=1, num_inference_steps=1).SerializeToString()
# The field name a violation uses for bytes that do not parse at all, where no one field
# can be blamed.
WHOLE_MESSAGE = "request"
# Not UTF-8: a bare continuation byte, an overlong NUL, a UTF-16 surrogate (what a lone
# surrogate becomes), a truncated sequence, a 5-byte form.
INVALID_UTF8 = [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"abc\xe2\x82", b"\xf8\x88\x80\x80\x80"]
MALFORMED = {
    "truncated varint": CHEAP_PREFIX + tag(4, 0),
    "length past the end": CHEAP_PREFIX + tag(2, 2) + varint(100) + b"abc",
    "eleven-byte varint": CHEAP_PREFIX + tag(4, 0) + b"\xff" * 10 + b"\x01",
    "field number zero": b"\x00\x01" + CHEAP_PREFIX,
    "unmatched end group": CHEAP_PREFIX + tag(30, 4),
    "unterminated start group": CHEAP_PREFIX + tag(30, 3),
    "wire type 6": CHEAP_PREFIX + tag(5, 6),
    "malformed preview": CHEAP_PREFIX + length_delimited(13, tag(1, 0)),
    "prompt of invalid UTF-8": length_delimited(2, b"a teapot \xff"),
}


def decodes(data: bytes) -> pb.GenerateRequest | None:
    """`data` parsed as the server's protobuf library parses it, or None if it cannot be."""
    try:
        return pb.GenerateRequest.FromString(data)
    except DecodeError:
        return None


def raw_problems(data: bytes, outcome: Outcome) -> list[str]:
    """What is wrong with how the server answered raw request bytes."""
    message = decodes(data)
    if message is not None:
        return outcome_problems(message, outcome)
    if outcome.error is None:
        return ["undecodable bytes generated images"]
    problems = status_problems(outcome.error)
    if outcome.error.code() != grpc.StatusCode.INVALID_ARGUMENT:
        problems.append(f"undecodable bytes got {outcome.error.code().name}, not INVALID_ARGUMENT")
    else:
        # Which field is at fault is not always knowable: the violation may name the
        # message as a whole.
        problems += violation_problems(violations_of(outcome.error), WHOLE_MESSAGE)
    return problems


def is_cheap(message: pb.GenerateRequest) -> bool:
    """Whether a parsed message, if valid, would generate quickly (raw bytes can ask for
    anything; those that parse into large valid work are not what these tests are for)."""
    width = message.width or DEFAULT_SIZE
    height = message.height or DEFAULT_SIZE
    steps = message.num_inference_steps or 8
    outputs = message.num_outputs or 1
    return width * height * min(steps, MAX_STEPS + 1) * min(outputs, MAX_OUTPUTS + 1) <= (
        128 * 128 * 8 * 3
    )


def raw_field(number: int, wire_type: int, payload: bytes) -> bytes:
    if wire_type == 0:
        return tag(number, 0) + varint(int.from_bytes(payload[:9] or b"\0", "little"))
    if wire_type == 2:
        return length_delimited(number, payload)
    if wire_type == 1:
        return tag(number, 1) + payload[:8].ljust(8, b"\0")
    if wire_type == 5:
        return tag(number, 5) + payload[:4].ljust(4, b"\0")
    return tag(number, wire_type) + payload  # groups and invalid wire types, raw


RAW_FIELDS = st.builds(
    raw_field,
    st.one_of(st.integers(1, 20), st.integers(0, 2**29 - 1)),
    st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]),
    st.binary(max_size=24),
)
RAW_MESSAGES = st.one_of(
    st.binary(max_size=200),
    st.lists(RAW_FIELDS, max_size=6).map(lambda fields: CHEAP_PREFIX + b"".join(fields)),
    st.builds(
        lambda number, data: CHEAP_PREFIX + length_delimited(number, data),
        st.sampled_from(sorted(STRING_FIELDS.values())),
        st.sampled_from(INVALID_UTF8) | st.binary(max_size=40),
    ),
)


@FUZZ
@given(data=RAW_MESSAGES)
@example(data=CHEAP_PREFIX + tag(4, 0) + b"\xff" * 9 + b"\x01")  # a 10-byte varint width
@example(data=CHEAP_PREFIX + tag(1000, 0) + varint(5))  # an unknown field
def test_raw_bytes_end_in_images_or_a_precise_status(raw_generate: Any, data: bytes) -> None:
    message = decodes(data)
    assume(message is None or is_cheap(message))
    outcome = call(raw_generate(data, timeout=CALL_TIMEOUT))
    problems = raw_problems(data, outcome)
    assert not problems, f"request bytes {data[:120]!r}:\n  " + "\n  ".join(problems)


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@FUZZ
@given(
    name=st.sampled_from(sorted(STRING_FIELDS)),
    bad=st.one_of(
        st.sampled_from(INVALID_UTF8), st.binary(max_size=40).filter(lambda data: not is_utf8(data))
    ),
    before=st.booleans(),
)
def test_invalid_utf8_in_a_string_field_is_invalid_argument_naming_it(
    raw_generate: Any, name: str, bad: bytes, before: bool
) -> None:
    field = length_delimited(STRING_FIELDS[name], "ok é ".encode() + bad)
    data = field + CHEAP_PREFIX if before else CHEAP_PREFIX + field
    assert decodes(data) is None
    outcome = call(raw_generate(data, timeout=CALL_TIMEOUT))
    assert outcome.error is not None, f"{bad!r} in {name} generated images"
    assert outcome.error.code() == grpc.StatusCode.INVALID_ARGUMENT, outcome.error
    assert not status_problems(outcome.error), status_problems(outcome.error)
    assert [v.field for v in violations_of(outcome.error)] == [name], bad


def test_malformed_protobuf_is_invalid_argument_with_one_warning_each(
    kiln_server: Any, raw_generate: Any
) -> None:
    before = len(kiln_server.logs())
    for what, data in MALFORMED.items():
        assert decodes(data) is None, what
        outcome = call(raw_generate(data, timeout=CALL_TIMEOUT))
        assert outcome.error is not None, what
        assert outcome.error.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, outcome.error)
        assert not status_problems(outcome.error), (what, status_problems(outcome.error))

    def new_records() -> list[dict[str, Any]]:
        return log_records(kiln_server.logs()[before:])

    deadline = time.monotonic() + 10
    while len([r for r in new_records() if r["level"] == "warning"]) < len(MALFORMED):
        assert time.monotonic() < deadline, f"fewer warnings than requests:\n{new_records()}"
        time.sleep(0.05)
    time.sleep(0.5)  # anything more the requests log arrives by now
    text = kiln_server.logs()[before:]
    assert "Traceback" not in text, text
    levels = [r["level"] for r in new_records()]
    assert levels.count("warning") == len(MALFORMED), text
    assert "error" not in levels and "critical" not in levels, text


def test_server_still_serving_after_the_fuzzing(
    kiln_server: Any, stub: pb_grpc.GenerationServiceStub
) -> None:
    assert kiln_server.health() == health_pb2.HealthCheckResponse.SERVING
    events = generate(stub, request(seed=3, num_inference_steps=2, num_outputs=2))
    assert kinds(events)[-1] == "completed"
    assert kiln_server.process.poll() is None
