"""Shared by the benchmark scripts: FLOPs of a model's networks, counted without running them.

torch's FlopCounterMode counts the matmuls, convolutions and attention of one forward pass
run on the `meta` device: shapes only, no weights, no compute, so the full-size SDXL UNet
is counted in seconds on any machine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch


def count_flops(run: Callable[[], object]) -> float:
    """FLOPs of the torch operations `run` performs (build its tensors on `meta`)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


def unet_flops(
    config: Mapping[str, Any],
    rows: int,
    latent_height: int,
    latent_width: int,
    *,
    tokens: int = 77,
    pooled_dim: int = 1280,
    num_time_ids: int = 6,
) -> float:
    """FLOPs of one call of the SDXL-style UNet described by `config` (its config.json).

    `rows` is the call's batch (2 per image under classifier-free guidance) on latents of
    `latent_height` x `latent_width`; `tokens`, `pooled_dim` and `num_time_ids` shape the
    text conditioning (SDXL: 77 tokens, 1280, 6 time ids).
    """
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet: Any = UNet2DConditionModel.from_config(dict(config))
        channels = int(config.get("in_channels", 4))
        context = int(config["cross_attention_dim"])
        return count_flops(
            lambda: unet(
                torch.randn(rows, channels, latent_height, latent_width),
                torch.full((rows,), 500.0),
                encoder_hidden_states=torch.randn(rows, tokens, context),
                added_cond_kwargs={
                    "text_embeds": torch.randn(rows, pooled_dim),
                    "time_ids": torch.randn(rows, num_time_ids),
                },
            )
        )
