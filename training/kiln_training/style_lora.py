"""Train a style LoRA for kiln-shapes and save it in diffusers' LoRA format.

    python -m kiln_training.style_lora --model models/kiln-shapes \\
        --out models/kiln-shapes/loras/closeup.safetensors

The style's scenes come from the synthetic data generator (`dataset.sample_scenes(...,
style=...)`) with the base data's captions, so the LoRA alone triggers the style (no
trigger word). The base model's VAE encodes them (`train.encode_pool`) and the UNet, its
weights frozen, trains LoRA adapters (PEFT) on its attention projections with the base
training's loop (`train.train_unet`): the same epsilon objective under SDXL's noise
schedule, Min-SNR weighting, caption dropout to zero embeddings (so guidance still works)
and an exponential moving average, whose adapters are saved. The text encoders stay
frozen. Every random draw is seeded, so a run with the same settings and thread count
gives the same file.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kiln_training.dataset import STYLES
from kiln_training.train import (
    TextConditioner,
    TrainSettings,
    all_captions,
    build_tokenizers,
    encode_pool,
    tokenize,
    train_unet,
)

TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class LoraSettings:
    """Everything that determines a LoRA run."""

    model: Path
    out: Path
    style: str = "closeup"
    seed: int = 0
    threads: int = 1
    rank: int = 8
    alpha: int = 8
    steps: int = 500
    batch: int = 32
    lr: float = 2e-3
    warmup_steps: int = 30
    latent_pool: int = 2048
    uncond_prob: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.98
    progress: bool = True


def load_components(model: Path) -> tuple[Any, Any, Any, Any]:
    """The model's VAE, both text encoders and UNet in float32, frozen, in eval mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    dtype = torch.float32
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype)
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype)
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
        model, subfolder="text_encoder_2", dtype=dtype
    )
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype)
    for module in (vae, text_encoder, text_encoder_2, unet):
        module.requires_grad_(False).eval()
    return vae, text_encoder, text_encoder_2, unet


def train_lora(settings: LoraSettings) -> dict[str, float]:
    """Train the LoRA and write it to `settings.out`; returns wall times per stage."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    torch.set_num_threads(settings.threads)
    seconds: dict[str, float] = {}
    vae, text_encoder, text_encoder_2, unet = load_components(settings.model)
    base = TrainSettings(
        out=settings.out.parent,
        seed=settings.seed,
        threads=settings.threads,
        latent_pool=settings.latent_pool,
        unet_steps=settings.steps,
        unet_batch=settings.batch,
        unet_lr=settings.lr,
        warmup_steps=settings.warmup_steps,
        uncond_prob=settings.uncond_prob,
        min_snr_gamma=settings.min_snr_gamma,
        ema_decay=settings.ema_decay,
        checkpoint_every=settings.steps,
        progress=settings.progress,
    )

    began = time.perf_counter()
    with torch.no_grad():
        pool = encode_pool(vae, base, style=settings.style)
    scaling_factor = float(vae.config.scaling_factor)
    seconds["encode"] = time.perf_counter() - began

    began = time.perf_counter()
    tokenizers = build_tokenizers()
    texts = all_captions()
    tokens = (tokenize(tokenizers[0], texts), tokenize(tokenizers[1], texts))
    torch.manual_seed(settings.seed)  # LoRA A matrices start random, B at zero
    unet.add_adapter(
        LoraConfig(
            r=settings.rank,
            lora_alpha=settings.alpha,
            init_lora_weights="gaussian",
            target_modules=list(TARGET_MODULES),
        )
    )
    text = TextConditioner(text_encoder, text_encoder_2)
    with tempfile.TemporaryDirectory(prefix="kiln-lora-") as state_dir:
        ema_unet, _, loss, _ = train_unet(
            unet, text, pool, scaling_factor, tokens, base, Path(state_dir)
        )
    seconds["train"] = time.perf_counter() - began

    layers = {k: v.to(torch.float16) for k, v in get_peft_model_state_dict(ema_unet).items()}
    settings.out.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(
        settings.out.parent,
        unet_lora_layers=layers,
        weight_name=settings.out.name,
        safe_serialization=True,
    )
    seconds["loss"] = loss
    return seconds


def parse_args(argv: Sequence[str] | None = None) -> LoraSettings:
    """Parse the command line into LoraSettings (defaults are the shipped LoRA's run)."""
    defaults = LoraSettings(model=Path("models/kiln-shapes"), out=Path("lora.safetensors"))
    parser = argparse.ArgumentParser(
        prog="python -m kiln_training.style_lora",
        description="Train a style LoRA for kiln-shapes on the CPU (diffusers LoRA format).",
    )
    parser.add_argument("--model", type=Path, default=defaults.model, help="model folder")
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    parser.add_argument("--style", choices=STYLES, default=defaults.style)
    for name in (
        "seed",
        "threads",
        "rank",
        "alpha",
        "steps",
        "batch",
        "warmup_steps",
        "latent_pool",
    ):
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name)
        )
    for name in ("lr", "uncond_prob", "min_snr_gamma", "ema_decay"):
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name)
        )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.steps < 1 or args.rank < 1:
        parser.error("--threads, --steps and --rank must be at least 1")
    if args.batch < 1 or args.latent_pool < args.batch or args.alpha < 1:
        parser.error("--batch and --alpha must be at least 1, and --latent-pool at least --batch")
    if not 0.0 <= args.uncond_prob < 1.0 or not 0.0 <= args.ema_decay < 1.0:
        parser.error("--uncond-prob and --ema-decay must be in [0, 1)")
    if not args.lr > 0 or args.warmup_steps < 0 or args.min_snr_gamma <= 0:
        parser.error("--lr and --min-snr-gamma must be above 0, --warmup-steps at least 0")
    values = vars(args)
    progress = not values.pop("no_progress")
    return LoraSettings(**values, progress=progress)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: train, print where the LoRA went and how long it took."""
    settings = parse_args(argv)
    began = time.perf_counter()
    seconds = train_lora(settings)
    total = time.perf_counter() - began
    print(
        f"wrote {settings.out} in {total / 60:.1f} min (encode {seconds['encode']:.0f}s, "
        f"train {seconds['train']:.0f}s, final loss {seconds['loss']:.4f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
