"""The configs of Kiln's shapes model: a small instance of the real SDXL architecture.

Every component is the class a real SDXL checkpoint uses: `AutoencoderKL` with 8x
downsampling and 4 latent channels, `CLIPTextModel` and `CLIPTextModelWithProjection` (whose
projected pooled embedding feeds the UNet's added conditioning), and a
`UNet2DConditionModel` with `addition_embed_type="text_time"`. Only the widths and depths
are small, so it trains on a CPU in minutes and the weights stay a few megabytes.
"""

from __future__ import annotations

import copy
from typing import Any

from kiln_server.models.tiny_sdxl import KILN_DEFAULTS, SCHEDULER_CONFIG
from kiln_training.dataset import IMAGE_SIZE

MODEL_NAME = "kiln-shapes"

CLIP_VOCAB_SIZE = 49408
MAX_TOKENS = 77

TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": CLIP_VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_TOKENS,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}

TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    **TEXT_ENCODER_CONFIG,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "projection_dim": 64,
}

ADDITION_TIME_EMBED_DIM = 16
NUM_TIME_IDS = 6

UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE // 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [64, 128],
    "layers_per_block": 1,
    "transformer_layers_per_block": [1, 1],
    "attention_head_dim": [4, 4],
    "cross_attention_dim": TEXT_ENCODER_CONFIG["hidden_size"]
    + TEXT_ENCODER_2_CONFIG["hidden_size"],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": ADDITION_TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": TEXT_ENCODER_2_CONFIG["projection_dim"]
    + NUM_TIME_IDS * ADDITION_TIME_EMBED_DIM,
    "norm_num_groups": 32,
}

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 64, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": IMAGE_SIZE,
    "scaling_factor": 1.0,  # replaced by the measured 1 / std of the training latents
    "force_upcast": False,
}

# Kiln's serving defaults for this model (same keys as the random-weight model's).
SHAPES_KILN_DEFAULTS: dict[str, Any] = {
    **KILN_DEFAULTS,
    "default_width": IMAGE_SIZE,
    "default_height": IMAGE_SIZE,
    "default_num_inference_steps": 20,
    "default_guidance_scale": 5.0,
    "default_scheduler": "K_EULER",
    "min_size": 64,
    "max_size": 256,
}


def scheduler_config() -> dict[str, Any]:
    """SDXL base's scheduler config (Euler, 1000 steps, scaled-linear betas, epsilon)."""
    return copy.deepcopy(SCHEDULER_CONFIG)


def time_ids(size: int = IMAGE_SIZE) -> list[float]:
    """SDXL's six added time ids for an uncropped square image: original, crop, target."""
    return [float(size), float(size), 0.0, 0.0, float(size), float(size)]
