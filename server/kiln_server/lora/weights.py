"""The normalised form of one LoRA: per target module a down and an up matrix and a scale."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LoraModule:
    """The LoRA of one target module, contributing `scale * up @ (down @ x)`.

    `down` is A, [r, in] for a Linear or [r, in, kh, kw] for a Conv2d (a kh x kw conv to r
    channels with the base layer's stride and padding); `up` is B, [out, r] (a 1x1 conv for
    a Conv2d). `scale` is what PEFT/diffusers multiply by: alpha / r (alpha / sqrt(r) for
    rsLoRA), before the per-request scale.
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        """r, the number of rows of `down`."""
        return int(self.down.shape[0])

    @property
    def is_conv(self) -> bool:
        """Whether this LoRA targets a Conv2d (its `down` has a kernel)."""
        return self.down.ndim == 4


@dataclass(frozen=True)
class LoraWeights:
    """One LoRA file, normalised: UNet modules and, kept apart, each text encoder's.

    Module names are those of diffusers' models (`down_blocks.1.attentions.0....to_q`).
    `text_encoders` maps `text_encoder` / `text_encoder_2` to that encoder's modules.
    `source_format` is `diffusers` (diffusers/PEFT keys) or `kohya` (kohya / A1111 keys).
    """

    name: str
    source_format: str
    unet: dict[str, LoraModule]
    text_encoders: dict[str, dict[str, LoraModule]] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """The largest rank of any module (0 when there are none)."""
        modules = list(self.unet.values())
        for encoder in self.text_encoders.values():
            modules.extend(encoder.values())
        return max((module.rank for module in modules), default=0)
