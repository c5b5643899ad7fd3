"""The image formats Kiln encodes and decodes: one table for the server, the gateway and
the client.

Each format is named as GenerateRequest's `output_format` names it (lower case), with the
MIME type the server sends in `ImageEvent.mime_type` and the file extension clients save
it under.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "IMAGE_FORMATS",
    "ImageFormat",
    "format_for_extension",
    "format_for_mime_type",
    "format_named",
]


@dataclass(frozen=True)
class ImageFormat:
    """One image format: its name ("png"), MIME type ("image/png"), extension (".png")."""

    name: str
    mime_type: str
    extension: str


IMAGE_FORMATS = (
    ImageFormat("png", "image/png", ".png"),
    ImageFormat("jpeg", "image/jpeg", ".jpg"),
    ImageFormat("webp", "image/webp", ".webp"),
)
"""Every format, PNG first (the default output format)."""

# Other names in use for a format's MIME type and extension.
_MIME_ALIASES = {"image/jpg": "image/jpeg"}
_EXTENSION_ALIASES = {".jpeg": ".jpg"}


def format_named(name: str) -> ImageFormat | None:
    """The format called `name` ("png", "jpeg", "webp"; any case), or None."""
    return next((f for f in IMAGE_FORMATS if f.name == name.lower()), None)


def format_for_mime_type(mime_type: str) -> ImageFormat | None:
    """The format of a MIME type (parameters and case ignored; "image/jpg" is JPEG), or
    None when Kiln has no such format."""
    bare = mime_type.split(";")[0].strip().lower()
    bare = _MIME_ALIASES.get(bare, bare)
    return next((f for f in IMAGE_FORMATS if f.mime_type == bare), None)


def format_for_extension(extension: str) -> ImageFormat | None:
    """The format saved under a file extension (with or without its dot, any case), or
    None."""
    wanted = "." + extension.lower().lstrip(".")
    wanted = _EXTENSION_ALIASES.get(wanted, wanted)
    return next((f for f in IMAGE_FORMATS if f.extension == wanted), None)
