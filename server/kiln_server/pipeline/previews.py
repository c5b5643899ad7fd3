"""Cheap previews: latents to RGB by a linear map, no VAE involved.

Each of the 4 latent channels contributes linearly to R, G and B (the approach ComfyUI and
A1111 take for live previews). SDXL's factors are the default; a model folder may carry its
own fitted factors in kiln.json (`latent_rgb_factors`, `latent_rgb_bias`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from kiln_server.imaging import MIME_TYPES

SDXL_LATENT_RGB_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)


@dataclass(frozen=True)
class EncodedPreview:
    """An encoded preview image and its size."""

    data: bytes
    mime_type: str
    width: int
    height: int


class LatentPreviewer:
    """Turns a batch of latents into one small RGB image (outputs side by side)."""

    def __init__(self, factors: Any = SDXL_LATENT_RGB_FACTORS, bias: Any = SDXL_LATENT_RGB_BIAS):
        self.factors = torch.tensor(factors, dtype=torch.float32)
        self.bias = torch.tensor(bias, dtype=torch.float32)
        self._device_copies: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def for_model(cls, kiln_config: dict[str, Any]) -> LatentPreviewer:
        """The model's fitted factors when its kiln.json has them, else SDXL's."""
        factors = kiln_config.get("latent_rgb_factors")
        bias = kiln_config.get("latent_rgb_bias")
        if factors is not None and bias is not None:
            return cls(factors, bias)
        return cls()

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Copied once per device: a host-to-device copy on every preview would stall the
        # engine thread until the GPU caught up.
        if device not in self._device_copies:
            self._device_copies[device] = (self.factors.to(device), self.bias.to(device))
        return self._device_copies[device]

    def to_rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """uint8 [h, B*w, 3] image of every latent in the batch laid side by side, computed
        on the latents' device (only these few pixels then cross to the host)."""
        factors, bias = self._on(latents.device)
        # [B, C, h, w] -> [h, B*w, C] @ [C, 3]
        tiled = torch.cat(list(latents.float()), dim=-1).permute(1, 2, 0)
        rgb = tiled @ factors + bias
        rgb = ((rgb + 1.0) / 2.0).clamp(0.0, 1.0)
        return (rgb * 255.0).round().to(torch.uint8)

    def encode(
        self, pixels: np.ndarray, max_size: int, image_format: str, quality: int
    ) -> EncodedPreview:
        """`to_rgb`'s pixels (on the host) scaled so the longest side is at most `max_size`,
        encoded as JPEG or WebP."""
        image = Image.fromarray(pixels)
        scale = max_size / max(image.width, image.height)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format=image_format.upper(), quality=quality)
        return EncodedPreview(buffer.getvalue(), MIME_TYPES[image_format], *image.size)
