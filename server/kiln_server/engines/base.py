"""The interface every engine implements, whatever runtime executes it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kiln_server.engines.components import ComponentSpec

BACKENDS = ("torch", "onnxruntime", "tensorrt")


class EngineError(RuntimeError):
    """An engine could not be loaded or run; the message names the component and the fix."""


class Engine(Protocol):
    """Runs one model component on named CPU/GPU tensors.

    `infer` takes exactly the component's declared inputs (by name) and returns every
    declared output by name, on the engine's device, as tensors the caller owns: no later
    call writes into them (schedulers keep past predictions, so a reused buffer would
    silently corrupt images).
    """

    spec: ComponentSpec
    # Largest batch one call accepts (a TensorRT profile's maximum); None for any.
    max_batch: int | None

    def infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the component once."""
        ...


@dataclass
class EngineSet:
    """The engines of one model on one backend: what the pipeline drives.

    Every engine takes inputs on `device` and returns outputs there. `placement` describes
    device and precision for logs and ListModels; `reason` says why this backend was
    chosen.
    """

    backend: str
    text_encoder: Engine
    text_encoder_2: Engine
    unet: Engine
    vae_decoder: Engine
    vae_encoder: Engine | None = None
    # The learned preview decoder, for models that have one (previews then look like the
    # final image); None: previews use the latent-to-RGB map only.
    preview_decoder: Engine | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    placement: str = "cpu fp32"
    reason: str = ""
