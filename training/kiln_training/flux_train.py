"""Train Kiln's default FLUX model, kiln-flux-shapes, from scratch on the CPU.

    python -m kiln_training.flux_train --out models/kiln-flux-shapes --threads 1

The FLUX.1 architecture at shapes size, trained on the same synthetic scenes as kiln-shapes
(kiln_training.train), in three stages with one progress bar each:

1. A 16-channel AutoencoderKL (8x downsampling, no quant convs, as FLUX.1's VAE) learns to
   reconstruct rendered scenes: train.py's VAE stage, run on this VAE.
2. A fixed pool of scenes is encoded once (train.py's pool); its latents fix the VAE's
   `shift_factor` (mean) and `scaling_factor` (1 / std after the shift) and fit the
   16x3 latent-to-RGB preview map stored in kiln.json.
3. The FluxTransformer2DModel trains jointly with a CLIP text encoder (its pooled output) and
   a small T5 encoder (its hidden states) with the rectified-flow objective: for packed
   latents x0 and noise, x_t = (1 - t) x0 + t noise, the model predicts noise - x0; t is
   logit-normal, shifted as the served scheduler shifts a 64 x 64 image's sigmas. A fraction
   of captions becomes the empty prompt (encoded as text, FLUX's negative), so the model
   serves true classifier-free guidance. It is schnell-style (no guidance embedding: with no
   teacher there is no distilled guidance to learn). The networks are written from an
   exponential moving average of their weights.

The T5 tokenizer is built by the project (kiln_server.models.t5_vocabulary) over the
dataset's words; the CLIP tokenizer is the real CLIP BPE. Every random draw comes from
generators seeded by (seed, stage, step), so a run is reproducible for a given seed and
thread count.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln_training.dataset import IMAGE_SIZE, vocabulary_words
from kiln_training.train import (
    INITIAL_LOGVAR,
    STATE_DIR,
    LatentPool,
    TrainSettings,
    _progress,
    all_captions,
    build_tokenizers,
    ema_update,
    encode_pool,
    fit_latent_rgb,
    lr_factor,
    step_generator,
    step_rng,
    tokenize,
    train_vae,
)

MODEL_NAME = "kiln-flux-shapes"
TRANSFORMER_STAGE = 4
LATENT_CHANNELS = 16
# Captions are at most 7 words and </s>; 16 leaves room for prompts spelled out in letters.
T5_TOKENS = 16

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": LATENT_CHANNELS,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 64, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": IMAGE_SIZE,
    # Replaced by the values measured on the encoded pool.
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": False,
}

# CLIP-L's role (the pooled embedding) at kiln-shapes' second text encoder's size.
CLIP_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 64,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}

T5_CONFIG: dict[str, Any] = {
    "d_model": 64,
    "d_kv": 16,
    "d_ff": 128,
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

TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 4 * LATENT_CHANNELS,
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": T5_CONFIG["d_model"],
    "pooled_projection_dim": CLIP_CONFIG["hidden_size"],
    "guidance_embeds": False,
    "axes_dims_rope": [8, 12, 12],
}

# Dynamic shifting scaled to this model's sizes: mu = base_shift at 64 px (16 image
# tokens), max_shift at 256 px (256 tokens).
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": (IMAGE_SIZE // 16) ** 2,
    "max_image_seq_len": (256 // 16) ** 2,
}

KILN_DEFAULTS: dict[str, Any] = {
    "family": "flux",
    "default_width": IMAGE_SIZE,
    "default_height": IMAGE_SIZE,
    "default_scheduler": "FLOW_MATCH_EULER",
    "default_num_inference_steps": 4,
    "default_guidance_scale": 3.0,
    # guidance_scale is true classifier-free guidance against the negative prompt
    # (default ""): the transformer has no guidance embedding.
    "guidance": "true_cfg",
    "default_negative_prompt": "",
    "max_sequence_length": T5_TOKENS,
    "min_size": IMAGE_SIZE,
    "max_size": 256,
}


@dataclass
class FluxTrainSettings:
    """Everything that determines a kiln-flux-shapes run (recorded in its kiln.json)."""

    out: Path
    seed: int = 0
    threads: int = 1
    vae_steps: int = 800
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-3
    latent_pool: int = 8192
    transformer_steps: int = 3000
    transformer_batch: int = 32
    transformer_lr: float = 5e-4
    warmup_steps: int = 100
    uncond_prob: float = 0.1
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    keep_state: bool = False
    progress: bool = True

    def record(self) -> dict[str, Any]:
        """The settings that shape the weights, as JSON-ready values."""
        skip = {"out", "keep_state", "progress", "checkpoint_every"}
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def vae_stage(self) -> TrainSettings:
        """train.py's settings for its VAE and pool stages, carrying this run's values."""
        return TrainSettings(
            out=self.out,
            seed=self.seed,
            threads=self.threads,
            vae_steps=self.vae_steps,
            vae_batch=self.vae_batch,
            vae_lr=self.vae_lr,
            kl_weight=self.kl_weight,
            latent_pool=self.latent_pool,
            warmup_steps=self.warmup_steps,
            checkpoint_every=self.checkpoint_every,
            progress=self.progress,
        )


@dataclass
class FluxTrainResult:
    """What a finished run produced: the folder, wall seconds per stage, final losses."""

    folder: Path
    seconds: dict[str, float]
    losses: dict[str, float]


class FluxTextConditioner(nn.Module):
    """CLIP and T5 encoders producing what the FLUX transformer is conditioned on: the T5
    last hidden states (no attention mask, as FluxPipeline) and CLIP's pooled output."""

    def __init__(self, text_encoder: nn.Module, text_encoder_2: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2

    def forward(
        self, clip_ids: torch.Tensor, t5_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        hidden = self.text_encoder_2(t5_ids, output_hidden_states=False)[0]
        return hidden, pooled


def build_t5_tokenizer() -> Any:
    """The project's T5 tokenizer over every word a caption can hold."""
    from kiln_server.models.t5_vocabulary import project_t5_tokenizer

    return project_t5_tokenizer(vocabulary_words(), T5_TOKENS)


def t5_tokenize(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """T5 ids (N, T5_TOKENS) padded and truncated as FluxPipeline does."""
    encoded = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=T5_TOKENS,
        truncation=True,
        return_tensors="pt",
    )
    return torch.as_tensor(encoded.input_ids)


def new_flux_models(seed: int, t5_vocab_size: int) -> tuple[Any, Any, Any, Any]:
    """Freshly initialised VAE, CLIP, T5 and transformer, seeded."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    vae: Any = AutoencoderKL(**VAE_CONFIG)
    with torch.no_grad():
        # A narrow initial posterior, for the reason train.new_models gives.
        vae.encoder.conv_out.bias[LATENT_CHANNELS:].fill_(INITIAL_LOGVAR)
    clip = CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG))
    t5 = T5EncoderModel(T5Config(vocab_size=t5_vocab_size, **T5_CONFIG))
    transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    return vae, clip, t5, transformer


def latent_statistics(pool: LatentPool) -> tuple[float, float]:
    """(shift_factor, scaling_factor) of the pool's posterior means: the mean, and 1 / std
    of the shifted latents, so the transformer sees zero-mean unit-variance latents."""
    shift = float(pool.mean.mean())
    return shift, float(1.0 / (pool.mean - shift).std())


def train_shift_sigmas(normal: torch.Tensor) -> torch.Tensor:
    """Training sigmas from standard normal draws: logit-normal, then shifted as the
    served scheduler shifts a default-size image's schedule (exp(mu) at 16 tokens)."""
    from kiln_server.pipeline.flux_schedulers import image_shift

    shift = math.exp(image_shift(SCHEDULER_CONFIG, (IMAGE_SIZE // 16) ** 2))
    sigma = torch.sigmoid(normal)
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def train_transformer(
    transformer: Any,
    text: FluxTextConditioner,
    pool: LatentPool,
    factors: tuple[float, float],
    tokens: tuple[torch.Tensor, torch.Tensor],
    settings: FluxTrainSettings,
) -> tuple[Any, FluxTextConditioner, float]:
    """Train transformer and text encoders jointly with the rectified-flow objective.

    `tokens` hold CLIP and T5 ids for `all_captions()` followed by the empty prompt (the
    last row), which replaces a caption with probability `uncond_prob`. `factors` are the
    VAE's (shift, scale). Returns the EMA copies and the last loss.
    """
    from kiln_server.pipeline.flux import latent_image_ids, pack_latents

    shift, scale = factors
    ema_transformer = copy.deepcopy(transformer).requires_grad_(False)
    ema_text = copy.deepcopy(text).requires_grad_(False)
    params = [*transformer.parameters(), *text.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.transformer_lr, weight_decay=0.0)
    transformer.train()
    text.train()
    batch = settings.transformer_batch
    side = IMAGE_SIZE // 16
    img_ids = latent_image_ids(side, side, torch.device("cpu"))
    txt_ids = torch.zeros(T5_TOKENS, 3)
    empty = tokens[0].shape[0] - 1
    total = settings.transformer_steps
    bar = _progress(total, 0, "transformer+text", settings.progress)
    last_loss = running = float("nan")
    for step in range(total):
        for group in optimizer.param_groups:
            group["lr"] = settings.transformer_lr * lr_factor(step, total, settings.warmup_steps)
        rng = step_rng(settings.seed, TRANSFORMER_STAGE, step)
        generator = step_generator(settings.seed, TRANSFORMER_STAGE, step)
        picks = torch.from_numpy(rng.integers(len(pool.mean), size=batch))
        dropped = torch.from_numpy(rng.random(batch) < settings.uncond_prob)

        latent_noise = torch.randn(pool.mean[picks].shape, generator=generator)
        latents = pool.mean[picks] + pool.std[picks] * latent_noise
        x0 = pack_latents((latents - shift) * scale)
        noise = torch.randn(x0.shape, generator=generator)
        sigma = train_shift_sigmas(torch.randn(batch, generator=generator))
        noisy = (1.0 - sigma.view(-1, 1, 1)) * x0 + sigma.view(-1, 1, 1) * noise

        captions = torch.where(dropped, empty, pool.caption_index[picks])
        hidden, pooled = text(tokens[0][captions], tokens[1][captions])
        prediction = transformer(
            hidden_states=noisy,
            timestep=sigma,
            pooled_projections=pooled,
            encoder_hidden_states=hidden,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        loss = (prediction - (noise - x0)).pow(2).mean()

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(settings.ema_decay, (1.0 + step) / (10.0 + step))
        ema_update(ema_transformer, transformer, decay)
        ema_update(ema_text, text, decay)

        last_loss = loss.item()
        running = last_loss if math.isnan(running) else 0.98 * running + 0.02 * last_loss
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
    bar.close()
    return ema_transformer.eval(), ema_text.eval(), last_loss


def write_flux_folder(
    folder: Path,
    vae: Any,
    text: FluxTextConditioner,
    transformer: Any,
    tokenizers: tuple[Any, Any],
    kiln_config: dict[str, Any],
) -> Path:
    """Write the model in diffusers' FluxPipeline layout (kiln_server.models.tiny_flux's)
    with fp16 safetensors and kiln.json, atomically."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from kiln_server.models.layout import staged_folder, write_flux_model_index

    with staged_folder(folder) as staging:
        modules = {
            "transformer": transformer,
            "vae": vae,
            "text_encoder": text.text_encoder,
            "text_encoder_2": text.text_encoder_2,
        }
        for name, module in modules.items():
            copy.deepcopy(module).to(torch.float16).save_pretrained(staging / name)
        for name, tokenizer in zip(("tokenizer", "tokenizer_2"), tokenizers, strict=True):
            tokenizer.save_pretrained(staging / name)
        FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG).save_pretrained(
            staging / "scheduler"
        )
        write_flux_model_index(staging)
        (staging / "kiln.json").write_text(json.dumps(kiln_config, indent=2) + "\n")
    return folder


def train_flux(settings: FluxTrainSettings) -> FluxTrainResult:
    """Run all three stages and write the model folder to `settings.out`.

    Same settings and thread count give the same weights.
    """
    torch.set_num_threads(settings.threads)
    out = settings.out
    state_dir = out / STATE_DIR
    if state_dir.exists():
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / ".gitignore").write_text("*\n")
    stage = settings.vae_stage()
    tokenizers = (build_tokenizers()[0], build_t5_tokenizer())
    vae, clip, t5, transformer = new_flux_models(settings.seed, len(tokenizers[1]))
    text = FluxTextConditioner(clip, t5)
    seconds: dict[str, float] = {}

    began = time.perf_counter()
    vae_l1 = train_vae(vae, stage, state_dir)
    vae.requires_grad_(False)
    seconds["vae"] = time.perf_counter() - began

    began = time.perf_counter()
    pool = encode_pool(vae, stage)
    shift, scale = latent_statistics(pool)
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    rgb_factors, rgb_bias = fit_latent_rgb(dataclasses.replace(pool, mean=pool.mean - shift), scale)
    seconds["encode"] = time.perf_counter() - began

    began = time.perf_counter()
    texts = [*all_captions(), ""]
    tokens = (tokenize(tokenizers[0], texts), t5_tokenize(tokenizers[1], texts))
    ema_transformer, ema_text, loss = train_transformer(
        transformer, text, pool, (shift, scale), tokens, settings
    )
    seconds["transformer"] = time.perf_counter() - began

    kiln_config = {
        **KILN_DEFAULTS,
        "latent_rgb_factors": rgb_factors,
        "latent_rgb_bias": rgb_bias,
        "training": {
            **settings.record(),
            "vae_l1": round(vae_l1, 5),
            "transformer_loss": round(loss, 5),
            "seconds": {k: round(v, 1) for k, v in seconds.items()},
        },
    }
    write_flux_folder(out, vae, ema_text, ema_transformer, tokenizers, kiln_config)
    if not settings.keep_state:
        shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    return FluxTrainResult(
        folder=out, seconds=seconds, losses={"vae_l1": vae_l1, "transformer": loss}
    )


# Bounds of the integer flags: (lowest, highest).
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "threads": (1, 256),
    "vae_steps": (1, 100_000),
    "vae_batch": (1, 1024),
    "latent_pool": (1, 1_000_000),
    "transformer_steps": (1, 100_000),
    "transformer_batch": (1, 1024),
    "warmup_steps": (0, 100_000),
    "checkpoint_every": (1, 100_000),
}
# Bounds of the float flags: (lowest, highest), the upper bound exclusive for uncond_prob.
FLOAT_BOUNDS: dict[str, tuple[float, float]] = {
    "vae_lr": (1e-7, 1.0),
    "kl_weight": (0.0, 1.0),
    "transformer_lr": (1e-7, 1.0),
    "uncond_prob": (0.0, 1.0),
    "ema_decay": (0.0, 1.0),
}


def parse_args(argv: Sequence[str] | None = None) -> FluxTrainSettings:
    """Parse the command line into FluxTrainSettings (defaults are the shipped model's
    run); an out-of-bounds value exits with a message naming the flag and its range."""
    defaults = FluxTrainSettings(out=Path("models") / MODEL_NAME)
    parser = argparse.ArgumentParser(
        prog="python -m kiln_training.flux_train",
        description="Train Kiln's FLUX shapes model (FLUX.1 architecture) from scratch on the CPU.",
    )
    parser.add_argument("--out", type=Path, default=defaults.out, help="model folder to write")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    for name, (low, high) in INT_BOUNDS.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=getattr(defaults, name),
            help=f"{low} to {high} (default %(default)s)",
        )
    for name, (low_f, high_f) in FLOAT_BOUNDS.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=float,
            default=getattr(defaults, name),
            help=f"{low_f} to {high_f} (default %(default)s)",
        )
    parser.add_argument(
        "--keep-state", action="store_true", help="keep <out>/.train-state/ after finishing"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    values = vars(args)
    for name, (low, high) in INT_BOUNDS.items():
        if not low <= values[name] <= high:
            parser.error(f"--{name.replace('_', '-')} must be from {low} to {high}")
    for name, (low_f, high_f) in FLOAT_BOUNDS.items():
        if not low_f <= values[name] < high_f:
            parser.error(f"--{name.replace('_', '-')} must be in [{low_f}, {high_f})")
    progress = not values.pop("no_progress")
    return FluxTrainSettings(**values, progress=progress)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: train, print where the model went and how long it took."""
    settings = parse_args(argv)
    began = time.perf_counter()
    result = train_flux(settings)
    total = time.perf_counter() - began
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items())
    print(f"wrote {result.folder} in {total / 60:.1f} min ({stages})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
