"""The image formats `image` and `mask` inputs may have, recognised by their first bytes.

Kiln decodes PNG, JPEG and WebP. Whatever a data URI, an upload or a web server claims, the
gateway trusts only the bytes: a file whose signature is none of these is refused before it
reaches Kiln.
"""

from __future__ import annotations

from kiln_client.image_formats import IMAGE_FORMATS

__all__ = ["IMAGE_TYPES", "IMAGE_TYPES_TEXT", "sniff_image_type"]

IMAGE_TYPES = tuple(f.mime_type for f in IMAGE_FORMATS)
"""MIME types of the accepted input formats."""
IMAGE_TYPES_TEXT = "PNG, JPEG or WebP"
"""The accepted formats as error messages name them."""

_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"


def sniff_image_type(data: bytes) -> str | None:
    """The MIME type the bytes' signature shows (one of IMAGE_TYPES), or None."""
    if data.startswith(_PNG):
        return "image/png"
    if data.startswith(_JPEG):
        return "image/jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None
