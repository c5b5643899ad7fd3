"""Encoding final images: PNG (with generation parameters), JPEG and WebP."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

# Output format name to MIME type. The server's imports of the client are held to its stubs
# (tests/test_client_package.py), so clients and the gateway read kiln_client.image_formats
# and tests/test_image_formats.py keeps the two tables equal.
MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
PARAMETERS_KEY = "parameters"


@dataclass(frozen=True)
class EncodedImage:
    """Encoded bytes of one image and what a client needs to know about them."""

    data: bytes
    mime_type: str
    width: int
    height: int


def encode_image(
    pixels: np.ndarray, image_format: str, quality: int, parameters: dict[str, Any]
) -> EncodedImage:
    """Encode uint8 HxWx3 pixels. PNGs carry `parameters` as JSON in a text chunk.

    The output depends only on the inputs (no timestamps), so equal pixels and parameters
    give byte-identical files.
    """
    image = Image.fromarray(pixels, mode="RGB") if pixels.ndim == 3 else Image.fromarray(pixels)
    buffer = io.BytesIO()
    if image_format == "png":
        info = PngInfo()
        info.add_text(PARAMETERS_KEY, json.dumps(parameters, sort_keys=True))
        image.save(buffer, format="PNG", pnginfo=info)
    elif image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=quality)
    elif image_format == "webp":
        image.save(buffer, format="WEBP", quality=quality)
    else:
        raise ValueError(f"unsupported image format {image_format!r}")
    return EncodedImage(buffer.getvalue(), MIME_TYPES[image_format], image.width, image.height)
