"""Typed Python client for Kiln's gRPC GenerationService (sync and asyncio) and the `kiln` CLI.

from kiln_client import KilnClient

with KilnClient("127.0.0.1:50051") as kiln:
    result = kiln.generate("a red circle on a blue background", seed=7)
    result.images[0].save("circle.png")

    # Inpainting: keep the product (black in the mask), repaint the background (white).
    result = kiln.generate("on a beach", image="photo.png", mask="mask.png", num_outputs=5)
"""

from kiln_client.admin import AsyncKilnAdminClient, KilnAdminClient
from kiln_client.aio import AsyncKilnClient
from kiln_client.client import KilnClient
from kiln_client.connection import ConnectionSettings, ConnectionSettingsError, RetryPolicy
from kiln_client.errors import KilnError
from kiln_client.image_input import MAX_IMAGE_BYTES, ImageInput, ImageInputError
from kiln_client.requests import build_request
from kiln_client.results import GeneratedImage, GenerationResult, Timings

__all__ = [
    "MAX_IMAGE_BYTES",
    "AsyncKilnAdminClient",
    "AsyncKilnClient",
    "ConnectionSettings",
    "ConnectionSettingsError",
    "GeneratedImage",
    "GenerationResult",
    "ImageInput",
    "ImageInputError",
    "KilnAdminClient",
    "KilnClient",
    "KilnError",
    "RetryPolicy",
    "Timings",
    "build_request",
]
