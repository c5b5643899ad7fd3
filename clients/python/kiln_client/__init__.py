"""Typed Python client for Kiln's gRPC GenerationService (sync and asyncio) and the `kiln` CLI.

from kiln_client import KilnClient

with KilnClient("127.0.0.1:50051") as kiln:
    result = kiln.generate("a red circle on a blue background", seed=7)
    result.images[0].save("circle.png")
"""

from kiln_client.aio import AsyncKilnClient
from kiln_client.client import KilnClient
from kiln_client.errors import KilnError
from kiln_client.requests import build_request
from kiln_client.results import GeneratedImage, GenerationResult, Timings

__all__ = [
    "AsyncKilnClient",
    "GeneratedImage",
    "GenerationResult",
    "KilnClient",
    "KilnError",
    "Timings",
    "build_request",
]
