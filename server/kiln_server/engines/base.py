"""The interface every engine implements, whatever runtime executes it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from kiln_server.engines.components import ComponentSpec

BACKENDS = ("torch", "onnxruntime", "tensorrt")


class EngineError(RuntimeError):
    """An engine could not be loaded or run; the message names the component and the fix."""


class Engine(Protocol):
    """Runs one model component on named CPU/GPU tensors.

    `infer` takes exactly the component's declared inputs (by name, declared dtypes) and
    returns every declared output by name. Engines may reuse output buffers between calls,
    so callers copy what they keep past the next call.
    """

    spec: ComponentSpec
    # Largest batch one call accepts (a TensorRT profile's maximum); None for any.
    max_batch: int | None

    def infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the component once."""
        ...


@dataclass
class EngineSet:
    """The engines of one model on one backend: what the pipeline drives."""

    backend: str
    text_encoder: Engine
    text_encoder_2: Engine
    unet: Engine
    vae_decoder: Engine
    vae_encoder: Engine | None = None
