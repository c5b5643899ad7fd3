"""Small models of the real FLUX.1 architecture, built deterministically from configs.

Each has every part a FLUX.1 folder has (a FluxTransformer2DModel over 2x2-packed latents,
a 16-channel VAE with FLUX's shift and scale, the CLIP-L text encoder giving the pooled
embedding with the real CLIP BPE tokenizer, a T5 encoder with a project-built tokenizer, a
FlowMatchEulerDiscreteScheduler config) at a size that runs on a CPU in milliseconds. Two
variants mirror the two FLUX.1 releases: dev-style (`guidance=True`: the transformer
embeds a distilled guidance scale; FLUX.1-dev's dynamic-shift scheduler config) and
schnell-style (`guidance=False`: no guidance embedding; FLUX.1-schnell's static-shift
config). Weights are seeded random numbers, so they exercise every code path a real
checkpoint takes but draw noise. Folders are written in diffusers' FluxPipeline layout and
load with `diffusers.FluxPipeline.from_pretrained(folder, local_files_only=True)` as well as
through Kiln's FLUX loader.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from kiln_server.models.clip_vocabulary import sdxl_tokenizers
from kiln_server.models.layout import staged_folder, write_flux_model_index
from kiln_server.models.t5_vocabulary import project_t5_tokenizer
from kiln_server.models.tiny_sdxl import TEXT_ENCODER_CONFIG as SDXL_TEXT_ENCODER_CONFIG

TINY_FLUX_NAME = "kiln-tiny-flux"
# Bump when anything below changes, so cached copies are rebuilt.
TINY_FLUX_REVISION = 1
WEIGHT_SEED = 20261130
# The T5 sequence length the tiny models are served at (FLUX.1 uses 256 or 512).
T5_TOKENS = 32

TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels in 2x2 patches
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,  # the T5 encoder's d_model
    "pooled_projection_dim": 32,  # the CLIP encoder's hidden size
    "axes_dims_rope": [4, 6, 6],  # sums to attention_head_dim
}

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 16, 32, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
    # FLUX.1's VAE values, so the shift and scale paths run with real numbers.
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": False,
}

# CLIP-L's role (the pooled embedding) at the tiny SDXL model's first encoder's size.
CLIP_CONFIG: dict[str, Any] = {**SDXL_TEXT_ENCODER_CONFIG, "num_hidden_layers": 2}

T5_CONFIG: dict[str, Any] = {
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 16,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}

# Whole-word pieces of the tiny T5 vocabulary; any other word is spelled in characters.
T5_WORDS = (
    "a an and the of on in with at photo picture painting product",
    "red green blue yellow purple orange white black grey brown pink",
    "circle square triangle cross star background teapot marble cat dog tree house",
)

# FLUX.1-dev's and FLUX.1-schnell's scheduler configs.
DEV_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
SCHNELL_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

# Kiln's serving defaults, stored beside the diffusers files (kiln.json).
KILN_DEFAULTS: dict[str, Any] = {
    "family": "flux",
    "default_width": 64,
    "default_height": 64,
    "default_scheduler": "FLOW_MATCH_EULER",
    "max_sequence_length": T5_TOKENS,
    "min_size": 32,
    "max_size": 256,
}
DEV_DEFAULTS: dict[str, Any] = {"default_num_inference_steps": 8, "default_guidance_scale": 3.5}
SCHNELL_DEFAULTS: dict[str, Any] = {
    "default_num_inference_steps": 4,
    "default_guidance_scale": 1.0,
}


def t5_words() -> list[str]:
    """Every whole word of the tiny T5 vocabulary."""
    return [word for line in T5_WORDS for word in line.split()]


def config_fingerprint(guidance: bool) -> str:
    """Hash of every config, the vocabulary and the seed of one variant: names its cached
    build."""
    scheduler = DEV_SCHEDULER_CONFIG if guidance else SCHNELL_SCHEDULER_CONFIG
    blob = json.dumps(
        [
            TRANSFORMER_CONFIG,
            guidance,
            VAE_CONFIG,
            CLIP_CONFIG,
            T5_CONFIG,
            T5_WORDS,
            T5_TOKENS,
            scheduler,
            WEIGHT_SEED,
        ],
        sort_keys=True,
    )
    return hashlib.sha256(f"{TINY_FLUX_REVISION}:{blob}".encode()).hexdigest()[:12]


def write_tiny_flux(folder: Path, *, guidance: bool) -> Path:
    """Build one variant with seeded weights and save it to `folder` in diffusers' FLUX
    layout. The same revision always yields the same weights; the folder appears only
    once complete."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from kiln_server.models.loader import quiet_library_progress

    quiet_library_progress()
    t5_tokenizer = project_t5_tokenizer(t5_words(), T5_TOKENS)
    with staged_folder(folder) as staging:
        torch.manual_seed(WEIGHT_SEED)
        transformer: Any = FluxTransformer2DModel(**TRANSFORMER_CONFIG, guidance_embeds=guidance)
        transformer.save_pretrained(staging / "transformer")
        torch.manual_seed(WEIGHT_SEED + 1)
        vae: Any = AutoencoderKL(**VAE_CONFIG)
        vae.save_pretrained(staging / "vae")
        torch.manual_seed(WEIGHT_SEED + 2)
        CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG)).save_pretrained(staging / "text_encoder")
        torch.manual_seed(WEIGHT_SEED + 3)
        t5_config = T5Config(vocab_size=len(t5_tokenizer), **T5_CONFIG)
        T5EncoderModel(t5_config).save_pretrained(staging / "text_encoder_2")
        # FLUX.1's tokenizer/ is CLIP-L's, which pads with <|endoftext|>.
        sdxl_tokenizers()[0].save_pretrained(staging / "tokenizer")
        t5_tokenizer.save_pretrained(staging / "tokenizer_2")
        scheduler = DEV_SCHEDULER_CONFIG if guidance else SCHNELL_SCHEDULER_CONFIG
        FlowMatchEulerDiscreteScheduler.from_config(scheduler).save_pretrained(
            staging / "scheduler"
        )
        write_flux_model_index(staging)
        defaults = {**KILN_DEFAULTS, **(DEV_DEFAULTS if guidance else SCHNELL_DEFAULTS)}
        (staging / "kiln.json").write_text(
            json.dumps({**defaults, "fingerprint": config_fingerprint(guidance)}, indent=2)
        )
    return folder


def tiny_flux_name(guidance: bool) -> str:
    """The variant's model name: kiln-tiny-flux-dev or kiln-tiny-flux-schnell."""
    return f"{TINY_FLUX_NAME}-{'dev' if guidance else 'schnell'}"


def ensure_tiny_flux(cache_dir: Path, *, guidance: bool = True) -> Path:
    """The folder of one built variant under `cache_dir` (dev-style with `guidance`, else
    schnell-style), building it when absent or stale (the folder name carries the configs'
    fingerprint)."""
    folder = cache_dir / f"{tiny_flux_name(guidance)}-{config_fingerprint(guidance)}"
    if not (folder / "model_index.json").is_file():
        write_tiny_flux(folder, guidance=guidance)
    return folder
