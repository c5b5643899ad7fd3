"""The outcome of one generation as plain dataclasses, and how a stream of events builds it.

`ResultCollector` is shared by the sync and asyncio clients: feed it every
`GenerateResponse` of a stream and ask for the `GenerationResult` once it has ended.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from kiln_client.errors import KilnError
from kiln_client.image_formats import format_for_mime_type
from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb

if TYPE_CHECKING:  # Pillow is an optional extra
    from PIL.Image import Image as PILImage

__all__ = [
    "GeneratedImage",
    "GenerationResult",
    "ResultCollector",
    "Timings",
    "extension_for_mime_type",
]


def _float32_decimal(value: float) -> float:
    """The shortest decimal that is the same float32 as `value` (0.8, not 0.800000011920929)."""
    single = struct.unpack("<f", struct.pack("<f", value))[0]
    for digits in range(1, 10):
        candidate = float(f"{single:.{digits}g}")
        if struct.unpack("<f", struct.pack("<f", candidate))[0] == single:
            return candidate
    return float(single)


def extension_for_mime_type(mime_type: str, default: str = ".bin") -> str:
    """The usual file extension (with its dot) for an image MIME type, `default` if unknown."""
    found = format_for_mime_type(mime_type)
    return found.extension if found is not None else default


@dataclass(frozen=True)
class GeneratedImage:
    """One final image: its output index, the seed that produced it and its encoded bytes."""

    index: int
    seed: int
    data: bytes = field(repr=False)
    mime_type: str
    width: int
    height: int

    @classmethod
    def from_event(cls, event: pb.ImageEvent) -> GeneratedImage:
        """Copy an `ImageEvent` into a `GeneratedImage`."""
        return cls(
            index=event.index,
            seed=event.seed,
            data=bytes(event.data),
            mime_type=event.mime_type,
            width=event.width,
            height=event.height,
        )

    @property
    def extension(self) -> str:
        """File extension matching `mime_type` (".png", ".jpg", ".webp"; ".bin" if unknown)."""
        return extension_for_mime_type(self.mime_type)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the encoded bytes to `path` as they are (no re-encoding); return the path.

        Missing parent directories are created. The file's format is `mime_type`, whatever
        extension `path` has.
        """
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self.data)
        return target

    def to_pil(self) -> PILImage:
        """The image decoded with Pillow, which the `pillow` extra installs.

        Raises:
            ImportError: Pillow is missing; the message names the install command.
        """
        try:
            from PIL import Image
        except ImportError as error:
            raise ImportError(
                "GeneratedImage.to_pil() needs Pillow: pip install 'kiln-client[pillow]' "
                "(or use .data, the encoded bytes, or .save(path))"
            ) from error
        image = Image.open(io.BytesIO(self.data))
        image.load()
        return image


@dataclass(frozen=True)
class Timings:
    """Where a request's time went, in seconds, as the server measured it."""

    queue_seconds: float = 0.0
    inference_seconds: float = 0.0
    engine_seconds: float = 0.0
    total_seconds: float = 0.0

    @classmethod
    def from_event(cls, event: pb.CompletedEvent) -> Timings:
        """Copy the timings of a `CompletedEvent`."""
        return cls(
            queue_seconds=event.queue_seconds,
            inference_seconds=event.inference_seconds,
            engine_seconds=event.engine_seconds,
            total_seconds=event.total_seconds,
        )


@dataclass
class GenerationResult:
    """A finished generation: every image (ordered by index), the timings and the settings.

    `started` is the server's `StartedEvent` (the resolved model, size, steps, scheduler,
    first seed, mode and strength), or None if the server never sent one.
    """

    request_id: str
    images: list[GeneratedImage]
    timings: Timings
    started: pb.StartedEvent | None = None

    @property
    def seeds(self) -> list[int]:
        """The seed of each image, in index order."""
        return [image.seed for image in self.images]

    @property
    def mode(self) -> str | None:
        """What the server ran: "text_to_image", "image_to_image" or "inpaint".

        None when it did not say: no started event, or a server that predates image
        conditioning (such a server ignores `image` and `mask` and draws from text).
        """
        if self.started is None or not self.started.mode:
            return None
        return self.started.mode

    @property
    def strength(self) -> float | None:
        """The strength the server used for an image-conditioned run (the model's default
        when the request gave none), as the decimal that was sent (0.8, not 0.800000011...);
        None for text-to-image or when the mode is unknown."""
        if self.started is None or self.mode in (None, "text_to_image"):
            return None
        return _float32_decimal(self.started.strength)


class ResultCollector:
    """Accumulates the events of one Generate stream into a `GenerationResult`."""

    def __init__(self) -> None:
        self.request_id = ""
        self.started: pb.StartedEvent | None = None
        self.images: dict[int, GeneratedImage] = {}
        self.completed: pb.CompletedEvent | None = None

    def add(self, response: pb.GenerateResponse) -> None:
        """Record one event (queued and progress events only contribute the request id)."""
        if response.request_id and not self.request_id:
            self.request_id = response.request_id
        kind = response.WhichOneof("event")
        if kind == "started":
            self.started = response.started
        elif kind == "image":
            image = GeneratedImage.from_event(response.image)
            self.images[image.index] = image
        elif kind == "completed":
            self.completed = response.completed

    def result(self) -> GenerationResult:
        """The collected result.

        Raises:
            KilnError: (code UNKNOWN) when the stream ended without a `completed` event,
                i.e. the server broke the contract; images received so far are lost.
        """
        if self.completed is None:
            raise KilnError(
                grpc.StatusCode.UNKNOWN,
                "the server ended the stream without a completed event "
                f"({len(self.images)} image(s) received)",
            )
        return GenerationResult(
            request_id=self.request_id,
            images=[self.images[index] for index in sorted(self.images)],
            timings=Timings.from_event(self.completed),
            started=self.started,
        )
