"""The `image` and `mask` arguments of a request: a path, bytes, a PIL image or a file, as bytes.

`read_image_input` is the one place that turns what a caller holds into the encoded bytes a
`GenerateRequest` carries. It checks only what needs no decoding: that a file exists and
can be read, that the data is not empty, and that it is no larger than `MAX_IMAGE_BYTES`.
Formats, pixel counts and the mask's shape are the server's to validate (it names the field
when it refuses). PIL is never imported here: a PIL image can only exist once its caller
has imported PIL, so recognising one needs nothing the client does not already have.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeAlias, Union

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = [
    "MAX_IMAGE_BYTES",
    "BinaryReadable",
    "ImageInput",
    "ImageInputError",
    "read_image_input",
]

MAX_IMAGE_BYTES = 20 * 1024 * 1024
"""Largest encoded `image` or `mask` the client sends: 20 MiB, a Kiln server's default
`ModelInfo.max_image_bytes`. Larger inputs are refused before anything is sent;
`build_request(max_image_bytes=...)` raises the limit for a server configured higher."""


class BinaryReadable(Protocol):
    """A file object opened for binary reading (`open(path, "rb")`, `io.BytesIO`, ...)."""

    def read(self, size: int = -1, /) -> bytes: ...


# Union[...], not X | Y: the quoted name (PIL stays unimported) cannot join | at runtime.
ImageInput: TypeAlias = Union[
    str, os.PathLike[str], bytes, bytearray, memoryview, BinaryReadable, "PILImage"
]
"""What `image` and `mask` accept: a path (str or os.PathLike), the encoded bytes (PNG, JPEG
or WebP), an open binary file (read from its current position), or a PIL image (encoded to
PNG, losslessly)."""


class ImageInputError(ValueError):
    """An `image` or `mask` the client refuses before sending anything.

    `argument` is "image" or "mask"; `source` is the file's path or name when the input came
    from a file (None for bytes and PIL images); `reason` says what is wrong and what to do.
    """

    def __init__(self, argument: str, reason: str, source: str | None = None) -> None:
        self.argument = argument
        self.reason = reason
        self.source = source
        super().__init__(self.message_for(argument))

    def message_for(self, label: str) -> str:
        """The message with `label` (such as a CLI flag) in place of the argument's name."""
        where = f"{label} {self.source}" if self.source else label
        return f"{where}: {self.reason}"


def _too_large(argument: str, size: int | None, limit: int, source: str | None) -> ImageInputError:
    measured = f"{size:,} bytes, over" if size is not None else "over"
    return ImageInputError(
        argument,
        f"too large: {measured} the limit of {limit / 2**20:g} MiB ({limit:,} bytes) per image "
        "or mask (a Kiln server's default max_image_bytes); scale it down or save it "
        "compressed (JPEG or WebP)",
        source,
    )


def _read_path(argument: str, path: Path, limit: int) -> bytes:
    source = str(path)
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > limit:
                raise _too_large(argument, size, limit, source)
            # Read one byte past the limit: a FIFO or a file still growing has no useful size.
            data = handle.read(limit + 1)
    except FileNotFoundError:
        raise ImageInputError(argument, "no such file", source) from None
    except IsADirectoryError:
        raise ImageInputError(argument, "a directory, not an image file", source) from None
    except PermissionError:
        raise ImageInputError(argument, "cannot be read: permission denied", source) from None
    except OSError as exc:
        raise ImageInputError(argument, f"cannot be read: {exc.strerror or exc}", source) from None
    if len(data) > limit:
        raise _too_large(argument, None, limit, source)
    return data


def _pil_image_class() -> type | None:
    module = sys.modules.get("PIL.Image")
    image_class = getattr(module, "Image", None)
    return image_class if isinstance(image_class, type) else None


def _encode_png(argument: str, picture: PILImage) -> bytes:
    buffer = io.BytesIO()
    try:
        picture.save(buffer, format="PNG")
    except (OSError, ValueError, KeyError) as exc:
        raise ImageInputError(
            argument,
            f"a PIL image in mode {picture.mode} cannot be stored losslessly as PNG ({exc}); "
            "convert it first, e.g. with .convert('RGB')",
        ) from None
    return buffer.getvalue()


def _read_file_object(
    argument: str, handle: BinaryReadable, limit: int, source: str | None
) -> bytes:
    try:
        data = handle.read(limit + 1)
    except OSError as exc:
        raise ImageInputError(argument, f"cannot be read: {exc.strerror or exc}", source) from None
    if isinstance(data, str):
        raise ImageInputError(
            argument, "opened in text mode; open the file with open(path, 'rb')", source
        )
    if not isinstance(data, bytes | bytearray):
        raise TypeError(f"{argument}.read() must return bytes; got {type(data).__name__}")
    if len(data) > limit:
        raise _too_large(argument, None, limit, source)
    return bytes(data)


def read_image_input(argument: str, value: ImageInput, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The encoded bytes of `value` (see `ImageInput`), checked but not decoded.

    A str or os.PathLike is a path; bytes, bytearray and memoryview are the encoded image; a
    PIL image is encoded to PNG (every mode PNG stores, pixel for pixel); any other object
    with `read()` is a binary file, read from its current position. `argument` names the
    argument in errors.

    Raises:
        ImageInputError: the file does not exist or cannot be read, the data is empty, a
            PIL image's mode cannot be stored as PNG, or the encoded data is larger than
            `max_bytes`; the message names `argument` and, for a file, its path.
        TypeError: `value` is none of the accepted kinds.
    """
    source: str | None = None
    if isinstance(value, str | os.PathLike):
        source = os.fsdecode(os.fspath(value))
        data = _read_path(argument, Path(source), max_bytes)
    elif isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
    elif (pil_image := _pil_image_class()) is not None and isinstance(value, pil_image):
        data = _encode_png(argument, value)  # type: ignore[arg-type]
    elif callable(getattr(value, "read", None)):
        name = getattr(value, "name", None)
        source = os.fsdecode(name) if isinstance(name, str | bytes) else None
        data = _read_file_object(argument, value, max_bytes, source)  # type: ignore[arg-type]
    else:
        raise TypeError(
            f"{argument} must be a path, bytes, a PIL image or a binary file object; "
            f"got {type(value).__name__}"
        )
    if not data:
        raise ImageInputError(argument, "empty; expected PNG, JPEG or WebP data", source)
    if len(data) > max_bytes:
        raise _too_large(argument, len(data), max_bytes, source)
    return data
