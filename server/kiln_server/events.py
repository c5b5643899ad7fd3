"""Events the batcher reports about one job; the API layer turns them into messages."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kiln_server.pipeline.previews import EncodedPreview


@dataclass(frozen=True)
class Queued:
    """The job waits; `position` jobs are ahead of it."""

    position: int


@dataclass(frozen=True)
class Started:
    """The job entered the running batch."""

    total_steps: int


@dataclass(frozen=True)
class Progress:
    """A denoising step finished (1-based), with a preview when one was due."""

    step: int
    total_steps: int
    preview: EncodedPreview | None = None


@dataclass(frozen=True)
class Decoded:
    """Every output of the job, uint8 [N, H, W, 3] on the host, in seed order."""

    pixels: np.ndarray


@dataclass(frozen=True)
class Finished:
    """Where the job's time went: queue, inference, and its share of engine time."""

    queue_seconds: float
    inference_seconds: float
    engine_seconds: float


@dataclass(frozen=True)
class Failed:
    """The job could not finish; `code` is a grpc.StatusCode name."""

    code: str
    message: str


@dataclass(frozen=True)
class Refused:
    """The job was never queued: the queue is full (retry after `retry_after` seconds) or
    the server is draining (`retry_after` is None)."""

    message: str
    retry_after: float | None = None


JobEvent = Queued | Started | Progress | Decoded | Finished | Failed | Refused
