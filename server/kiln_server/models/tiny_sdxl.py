"""A small model of the real SDXL architecture, built deterministically from configs.

It has every part a real SDXL checkpoint has (a UNet with SDXL's added text/time
conditioning, two CLIP text encoders with the second projecting the pooled embedding, an
8x-downsampling VAE, the real CLIP BPE tokenizers, an Euler scheduler config) at a size that
runs on a CPU in milliseconds. Its weights are seeded random numbers: it exercises every
code path a real checkpoint takes but draws noise. It is written in the diffusers folder
layout and loaded back through the same loader as any SDXL folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from kiln_server.models.clip_vocabulary import sdxl_tokenizers
from kiln_server.models.layout import staged_folder, write_model_index

TINY_SDXL_NAME = "kiln-tiny-sdxl"
# Bump when any config below changes, so cached copies are rebuilt.
TINY_SDXL_REVISION = 2
WEIGHT_SEED = 20261123

TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}

UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [2, 4],
    "cross_attention_dim": 64,  # hidden sizes of both text encoders, concatenated
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,  # pooled text + 6 time ids
    "norm_num_groups": 32,
}

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 16, 32, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.13025,
    "force_upcast": False,
}

# A learned preview decoder of the AutoencoderTiny architecture (taesdxl's layout at small
# width): random weights, so every backend's preview-decoder path runs in the tests.
PREVIEW_DECODER_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "encoder_block_out_channels": [8, 8, 8, 8],
    "decoder_block_out_channels": [8, 8, 8, 8],
    "num_encoder_blocks": [1, 1, 1, 1],
    "num_decoder_blocks": [1, 1, 1, 1],
    "scaling_factor": 1.0,
}

# SDXL base's scheduler config (EulerDiscreteScheduler, "leading" spacing).
SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "clip_sample": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
}

# Kiln's serving defaults for this model, stored beside the diffusers files.
KILN_DEFAULTS: dict[str, Any] = {
    "family": "sdxl",
    "default_width": 64,
    "default_height": 64,
    "default_num_inference_steps": 20,
    "default_guidance_scale": 7.5,
    "default_scheduler": "K_EULER",
    "min_size": 32,
    "max_size": 512,
}


def config_fingerprint() -> str:
    """Hash of every config and the seed: names the cached build of this exact model."""
    blob = json.dumps(
        [
            TEXT_ENCODER_CONFIG,
            UNET_CONFIG,
            VAE_CONFIG,
            PREVIEW_DECODER_CONFIG,
            SCHEDULER_CONFIG,
            WEIGHT_SEED,
        ],
        sort_keys=True,
    )
    return hashlib.sha256(f"{TINY_SDXL_REVISION}:{blob}".encode()).hexdigest()[:12]


def write_tiny_sdxl(folder: Path) -> Path:
    """Build the model with seeded weights and save it to `folder` in diffusers layout.

    The same revision always yields the same weights, so images are reproducible across
    servers. Writes into a temporary sibling first, so a crash never leaves half a model.
    """
    from diffusers import (
        AutoencoderKL,
        AutoencoderTiny,
        EulerDiscreteScheduler,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
    )

    from kiln_server.models.loader import quiet_library_progress

    quiet_library_progress()
    with staged_folder(folder) as staging:
        torch.manual_seed(WEIGHT_SEED)
        unet: Any = UNet2DConditionModel(**UNET_CONFIG)
        unet.save_pretrained(staging / "unet")
        torch.manual_seed(WEIGHT_SEED + 1)
        vae: Any = AutoencoderKL(**VAE_CONFIG)
        vae.save_pretrained(staging / "vae")
        text_config = CLIPTextConfig(**TEXT_ENCODER_CONFIG)
        torch.manual_seed(WEIGHT_SEED + 2)
        CLIPTextModel(text_config).save_pretrained(staging / "text_encoder")
        torch.manual_seed(WEIGHT_SEED + 3)
        CLIPTextModelWithProjection(text_config).save_pretrained(staging / "text_encoder_2")
        torch.manual_seed(WEIGHT_SEED + 4)
        preview: Any = AutoencoderTiny(**PREVIEW_DECODER_CONFIG)
        with torch.no_grad():
            # Default init draws a near-black image whatever the latents; a wider, centred
            # last layer spreads the output over the colour range, so previews of
            # different latents differ visibly.
            last = preview.decoder.layers[-1]
            last.weight.mul_(6.0)
            last.bias.add_(0.6)
        # Only the decoder is used; fp16, as a trained one ships.
        preview.half().save_pretrained(staging / "preview_decoder")
        tokenizer, tokenizer_2 = sdxl_tokenizers()
        tokenizer.save_pretrained(staging / "tokenizer")
        tokenizer_2.save_pretrained(staging / "tokenizer_2")
        EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG).save_pretrained(staging / "scheduler")
        write_model_index(staging)
        (staging / "kiln.json").write_text(
            json.dumps({**KILN_DEFAULTS, "fingerprint": config_fingerprint()}, indent=2)
        )
    return folder


def ensure_tiny_sdxl(cache_dir: Path) -> Path:
    """Return the folder of the built model under cache_dir, building it if absent or stale."""
    folder = cache_dir / f"{TINY_SDXL_NAME}-{config_fingerprint()}"
    if not (folder / "model_index.json").is_file():
        write_tiny_sdxl(folder)
    return folder
