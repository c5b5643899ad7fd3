"""Train Kiln's shapes model from scratch on the CPU and write it as a diffusers folder.

    python -m kiln_training.train --out models/kiln-shapes

Three stages, one progress bar each:

1. The VAE (AutoencoderKL, 8x downsampling, 4 latent channels) learns to reconstruct
   freshly rendered scenes.
2. A fixed pool of scenes is encoded once; the latents' standard deviation fixes the VAE's
   `scaling_factor`, and the pool fits the preview factors stored in kiln.json.
3. Both CLIP text encoders and the UNet train jointly on those latents with the usual
   epsilon objective under SDXL's noise schedule. A fraction of captions is dropped to
   zero embeddings (SDXL's `force_zeros_for_empty_prompt` negative), so classifier-free
   guidance works. The UNet and text encoders are written from an exponential moving
   average of their weights.

Every random draw comes from generators seeded by (seed, stage, step), so a run is
reproducible for a given seed and thread count and a resumed run (`--resume`, from the
checkpoints under `<out>/.train-state/`) continues exactly where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from kiln_training import architecture as arch
from kiln_training.dataset import (
    COLOURS,
    SHAPES,
    Scene,
    caption,
    render_batch,
    sample_scenes,
)

STATE_DIR = ".train-state"
INITIAL_LOGVAR = -6.0
VAE_STAGE = 1
UNET_STAGE = 3
POOL_SEED_OFFSET = 1_000_003


@dataclass
class TrainSettings:
    """Everything that determines a training run (recorded in the model's kiln.json)."""

    out: Path
    seed: int = 0
    threads: int = 1
    vae_steps: int = 1000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-3
    latent_pool: int = 8192
    unet_steps: int = 3000
    unet_batch: int = 32
    unet_lr: float = 5e-4
    warmup_steps: int = 100
    uncond_prob: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    resume: bool = False
    stop_after: int | None = None
    keep_state: bool = False
    progress: bool = True

    def record(self) -> dict[str, Any]:
        """The settings that shape the weights, as JSON-ready values."""
        skip = {"out", "resume", "stop_after", "keep_state", "progress", "checkpoint_every"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


@dataclass
class TrainResult:
    """What a finished run produced: the folder, wall times per stage, final losses."""

    folder: Path
    seconds: dict[str, float]
    losses: dict[str, float]
    done: bool = True


# --------------------------------------------------------------------------- helpers


def step_rng(seed: int, stage: int, step: int) -> np.random.Generator:
    """numpy generator for one step of one stage: the same triple gives the same draws."""
    return np.random.default_rng([seed, stage, step])


def step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    """torch generator for one step of one stage, seeded from the same triple."""
    value = int(np.random.default_rng([seed, stage, step, 7]).integers(2**62))
    return torch.Generator().manual_seed(value)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_tokenizers() -> tuple[Any, Any]:
    """SDXL's two CLIP tokenizers over the real CLIP BPE vocabulary.

    The first pads with the end token, the second with "!" (id 0), as SDXL base does.
    """
    from kiln_server.models.clip_vocabulary import sdxl_tokenizers

    return sdxl_tokenizers(arch.MAX_TOKENS)


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids (N, 77) padded and truncated the way the SDXL pipeline does."""
    encoded = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=arch.MAX_TOKENS,
        truncation=True,
        return_tensors="pt",
    )
    return torch.as_tensor(encoded.input_ids)


class TextConditioner(nn.Module):
    """Both CLIP encoders, producing what the SDXL UNet is conditioned on.

    Returns the concatenated penultimate hidden states of both encoders (the UNet's
    cross-attention context) and the second encoder's projected pooled embedding.
    """

    def __init__(self, text_encoder: nn.Module, text_encoder_2: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2

    def forward(self, ids: torch.Tensor, ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        output_2 = self.text_encoder_2(ids_2, output_hidden_states=True)
        context = torch.cat([hidden, output_2.hidden_states[-2]], dim=-1)
        return context, output_2.text_embeds


def new_models(seed: int) -> tuple[Any, Any, Any, Any]:
    """Freshly initialised VAE, text encoders and UNet, seeded."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    vae: Any = AutoencoderKL(**arch.VAE_CONFIG)
    with torch.no_grad():
        # Start with a narrow posterior (std ≈ 0.05): with unit std the sampled
        # latents are mostly noise and the decoder learns nothing for hundreds of steps.
        vae.encoder.conv_out.bias[arch.VAE_CONFIG["latent_channels"] :].fill_(INITIAL_LOGVAR)
    text_encoder = CLIPTextModel(CLIPTextConfig(**arch.TEXT_ENCODER_CONFIG))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**arch.TEXT_ENCODER_2_CONFIG))
    unet = UNet2DConditionModel(**arch.UNET_CONFIG)
    return vae, text_encoder, text_encoder_2, unet


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model, parameter by parameter."""
    for ema_p, p in zip(ema.parameters(), model.parameters(), strict=True):
        ema_p.lerp_(p, 1.0 - decay)


def _save_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _progress(total: int, initial: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="step",
        disable=not enabled,
        dynamic_ncols=True,
        file=sys.stderr,
    )


# --------------------------------------------------------------------------- stage 1: VAE


def train_vae(vae: Any, settings: TrainSettings, state_dir: Path) -> float:
    """Train the VAE on freshly rendered scenes; returns the final reconstruction L1."""
    checkpoint = state_dir / "vae.pt"
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    start, last_loss = 0, float("nan")
    if settings.resume and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, last_loss = int(state["step"]), float(state["loss"])
    vae.train()
    total = settings.vae_steps
    bar = _progress(total, start, "VAE", settings.progress)
    for step in range(start, total):
        for group in optimizer.param_groups:
            group["lr"] = settings.vae_lr * lr_factor(step, total, settings.warmup_steps)
        scenes = sample_scenes(settings.vae_batch, seed=_scene_seed(settings.seed, step))
        images = torch.from_numpy(render_batch(scenes))
        posterior = vae.encode(images).latent_dist
        latents = posterior.sample(generator=step_generator(settings.seed, VAE_STAGE, step))
        decoded = vae.decode(latents).sample
        l1 = (decoded - images).abs().mean()
        loss = (
            l1
            + F.mse_loss(decoded, images)
            + settings.kl_weight * posterior.kl().mean() / (latents[0].numel())
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        last_loss = l1.item()
        bar.update(1)
        bar.set_postfix(l1=f"{last_loss:.4f}")
        done = step + 1
        if done % settings.checkpoint_every == 0 or done == total:
            _save_state(
                checkpoint,
                {
                    "model": vae.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": done,
                    "loss": last_loss,
                },
            )
    bar.close()
    vae.eval()
    return last_loss


def _scene_seed(seed: int, step: int) -> int:
    return int(step_rng(seed, VAE_STAGE, step).integers(2**62))


# --------------------------------------------------------------------------- stage 2: pool


@dataclass
class LatentPool:
    """Encoded training scenes: posterior means and stds, caption index per scene."""

    mean: torch.Tensor
    std: torch.Tensor
    caption_index: torch.Tensor
    images_small: torch.Tensor  # (N, 3, h, w) 8x-averaged images in [-1, 1], for previews


def all_captions() -> list[str]:
    """Every caption the dataset can produce, in a fixed order."""
    return [
        caption(Scene(shape=s, colour=c, background=b))
        for s in SHAPES
        for c in COLOURS
        for b in COLOURS
        if c != b
    ]


@torch.no_grad()
def encode_pool(vae: Any, settings: TrainSettings, style: str | None = None) -> LatentPool:
    """Render and encode `latent_pool` scenes with the trained VAE (deterministic).

    `style` (one of dataset.STYLES) draws every scene in that style, captions unchanged.
    """
    scenes = sample_scenes(settings.latent_pool, seed=settings.seed + POOL_SEED_OFFSET, style=style)
    index = {text: i for i, text in enumerate(all_captions())}
    means, stds, smalls = [], [], []
    chunk = 256
    bar = _progress(len(scenes), 0, "encode", settings.progress)
    for start in range(0, len(scenes), chunk):
        images = torch.from_numpy(render_batch(scenes[start : start + chunk]))
        posterior = vae.encode(images).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        smalls.append(F.avg_pool2d(images, 8))
        bar.update(images.shape[0])
    bar.close()
    return LatentPool(
        mean=torch.cat(means),
        std=torch.cat(stds),
        caption_index=torch.tensor([index[caption(s)] for s in scenes]),
        images_small=torch.cat(smalls),
    )


def fit_latent_rgb(
    pool: LatentPool, scaling_factor: float
) -> tuple[list[list[float]], list[float]]:
    """Least-squares map from scaled latents to RGB in [-1, 1] (for step previews).

    Returns (factors Cx3 for C latent channels, bias 3) with rgb ≈ latent·factors + bias,
    where `latent` is what the denoising loop holds (the VAE's latent times its scaling
    factor) and each latent pixel is compared with the mean colour of the 8x8 image patch
    above it.
    """
    channels = pool.mean.shape[1]
    latents = (pool.mean * scaling_factor).permute(0, 2, 3, 1).reshape(-1, channels).double()
    rgb = pool.images_small.permute(0, 2, 3, 1).reshape(-1, 3).double()
    design = torch.cat([latents, torch.ones(len(latents), 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, rgb).solution
    factors = [[round(float(v), 6) for v in row] for row in solution[:channels]]
    bias = [round(float(v), 6) for v in solution[channels]]
    return factors, bias


# --------------------------------------------------------------------------- stage 3: UNet


def min_snr_weights(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Min-SNR-γ loss weights for epsilon prediction: min(SNR, γ) / SNR per sample."""
    alpha = alphas_cumprod[timesteps]
    snr = alpha / (1.0 - alpha)
    return torch.clamp(snr, max=gamma) / snr


def train_unet(
    unet: Any,
    text: TextConditioner,
    pool: LatentPool,
    scaling_factor: float,
    tokens: tuple[torch.Tensor, torch.Tensor],
    settings: TrainSettings,
    state_dir: Path,
) -> tuple[nn.Module, TextConditioner, float, bool]:
    """Train UNet and text encoders jointly from the last checkpoint.

    Returns their EMA copies, the last loss, and whether all steps are done (False when
    `stop_after` ended the run early, its state saved for `--resume`).
    """
    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler.from_config(arch.scheduler_config())
    alphas_cumprod = noise_schedule.alphas_cumprod.float()
    num_train_timesteps = int(noise_schedule.config.num_train_timesteps)

    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    ema_text = copy.deepcopy(text).requires_grad_(False)
    params = [*unet.parameters(), *text.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.unet_lr, weight_decay=0.0)
    checkpoint = state_dir / "unet.pt"
    start, last_loss = 0, float("nan")
    if settings.resume and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        optimizer.load_state_dict(state["optimizer"])
        start, last_loss = int(state["step"]), float(state["loss"])

    unet.train()
    text.train()
    batch = settings.unet_batch
    time_ids = torch.tensor([arch.time_ids()] * batch)
    total = settings.unet_steps
    end = total if settings.stop_after is None else max(start, min(total, settings.stop_after))
    bar = _progress(total, start, "UNet+text", settings.progress)
    running = last_loss
    for step in range(start, end):
        for group in optimizer.param_groups:
            group["lr"] = settings.unet_lr * lr_factor(step, total, settings.warmup_steps)
        rng = step_rng(settings.seed, UNET_STAGE, step)
        generator = step_generator(settings.seed, UNET_STAGE, step)
        picks = torch.from_numpy(rng.integers(len(pool.mean), size=batch))
        keep = torch.from_numpy(rng.random(batch) >= settings.uncond_prob).float()

        latent_noise = torch.randn(pool.mean[picks].shape, generator=generator)
        x0 = (pool.mean[picks] + pool.std[picks] * latent_noise) * scaling_factor
        noise = torch.randn(x0.shape, generator=generator)
        timesteps = torch.randint(0, num_train_timesteps, (batch,), generator=generator)
        alpha = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * x0 + (1.0 - alpha).sqrt() * noise

        captions = pool.caption_index[picks]
        context, pooled = text(tokens[0][captions], tokens[1][captions])
        # Dropped captions become zeros: SDXL's negative for an empty prompt.
        context = context * keep.view(-1, 1, 1)
        pooled = pooled * keep.view(-1, 1)
        prediction = unet(
            noisy,
            timesteps,
            encoder_hidden_states=context,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample
        per_sample = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
        weights = min_snr_weights(alphas_cumprod, timesteps, settings.min_snr_gamma)
        loss = (per_sample * weights).mean()

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(settings.ema_decay, (1.0 + step) / (10.0 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text, decay)

        last_loss = loss.item()
        running = last_loss if math.isnan(running) else 0.98 * running + 0.02 * last_loss
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
        done = step + 1
        if done % settings.checkpoint_every == 0 or done == end:
            _save_state(
                checkpoint,
                {
                    "unet": unet.state_dict(),
                    "text": text.state_dict(),
                    "ema_unet": ema_unet.state_dict(),
                    "ema_text": ema_text.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": done,
                    "loss": last_loss,
                },
            )
    bar.close()
    return ema_unet.eval(), ema_text.eval(), last_loss, end == total


# --------------------------------------------------------------------------- writing


def write_model_folder(
    folder: Path,
    vae: Any,
    text: TextConditioner,
    unet: Any,
    tokenizers: tuple[Any, Any],
    kiln_config: dict[str, Any],
) -> Path:
    """Write the model in diffusers layout with fp16 safetensors, atomically.

    The folder holds model_index.json, unet/, vae/, text_encoder/, text_encoder_2/,
    tokenizer/, tokenizer_2/, scheduler/ and kiln.json; an existing folder is replaced only
    once the new one is complete (its `.train-state/` is carried over when present).
    """
    from diffusers import EulerDiscreteScheduler

    from kiln_server.models.layout import staged_folder, write_model_index

    with staged_folder(folder, carry=(STATE_DIR,)) as staging:
        modules = {
            "unet": unet,
            "vae": vae,
            "text_encoder": text.text_encoder,
            "text_encoder_2": text.text_encoder_2,
        }
        for name, module in modules.items():
            copy.deepcopy(module).to(torch.float16).save_pretrained(staging / name)
        for name, tokenizer in zip(("tokenizer", "tokenizer_2"), tokenizers, strict=True):
            tokenizer.save_pretrained(staging / name)
        EulerDiscreteScheduler.from_config(arch.scheduler_config()).save_pretrained(
            staging / "scheduler"
        )
        write_model_index(staging)
        (staging / "kiln.json").write_text(json.dumps(kiln_config, indent=2) + "\n")
    return folder


def train(settings: TrainSettings) -> TrainResult:
    """Run both stages and write the model folder to `settings.out`.

    Same settings and thread count give the same weights. With `resume`, finished stages
    and the last checkpoint under `<out>/.train-state/` are reused.
    """
    torch.set_num_threads(settings.threads)
    out = settings.out
    state_dir = out / STATE_DIR
    if not settings.resume and state_dir.exists():
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    # Checkpoints are large (optimizer moments) and never belong in version control.
    (state_dir / ".gitignore").write_text("*\n")
    seconds: dict[str, float] = {}
    vae, text_encoder, text_encoder_2, unet = new_models(settings.seed)
    text = TextConditioner(text_encoder, text_encoder_2)

    began = time.perf_counter()
    vae_l1 = train_vae(vae, settings, state_dir)
    vae.requires_grad_(False)
    seconds["vae"] = time.perf_counter() - began

    began = time.perf_counter()
    pool = encode_pool(vae, settings)
    scaling_factor = float(1.0 / pool.mean.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    factors, bias = fit_latent_rgb(pool, scaling_factor)
    seconds["encode"] = time.perf_counter() - began

    began = time.perf_counter()
    tokenizers = build_tokenizers()
    texts = all_captions()
    tokens = (tokenize(tokenizers[0], texts), tokenize(tokenizers[1], texts))
    ema_unet, ema_text, unet_loss, finished = train_unet(
        unet, text, pool, scaling_factor, tokens, settings, state_dir
    )
    seconds["unet"] = time.perf_counter() - began
    if not finished:
        return TrainResult(
            folder=out, seconds=seconds, losses={"vae_l1": vae_l1, "unet": unet_loss}, done=False
        )

    kiln_config = {
        **arch.SHAPES_KILN_DEFAULTS,
        "latent_rgb_factors": factors,
        "latent_rgb_bias": bias,
        "training": {
            **settings.record(),
            "vae_l1": round(vae_l1, 5),
            "unet_loss": round(unet_loss, 5),
            "seconds": {k: round(v, 1) for k, v in seconds.items()},
        },
    }
    write_model_folder(out, vae, ema_text, ema_unet, tokenizers, kiln_config)
    if not settings.keep_state:
        shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    return TrainResult(folder=out, seconds=seconds, losses={"vae_l1": vae_l1, "unet": unet_loss})


def parse_args(argv: Sequence[str] | None = None) -> TrainSettings:
    """Parse the command line into TrainSettings (defaults are the shipped model's run)."""
    defaults = TrainSettings(out=Path("models/kiln-shapes"))
    parser = argparse.ArgumentParser(
        prog="python -m kiln_training.train",
        description="Train Kiln's shapes model (SDXL architecture) from scratch on the CPU.",
    )
    parser.add_argument("--out", type=Path, default=defaults.out, help="model folder to write")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--threads", type=int, default=defaults.threads, help="torch.set_num_threads value"
    )
    for name in (
        "vae_steps",
        "vae_batch",
        "latent_pool",
        "unet_steps",
        "unet_batch",
        "warmup_steps",
        "checkpoint_every",
    ):
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name)
        )
    for name in ("vae_lr", "kl_weight", "unet_lr", "uncond_prob", "min_snr_gamma", "ema_decay"):
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name)
        )
    parser.add_argument(
        "--resume", action="store_true", help="continue from <out>/.train-state/ checkpoints"
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop after this many UNet steps, keeping the state for --resume",
    )
    parser.add_argument(
        "--keep-state", action="store_true", help="keep <out>/.train-state/ after finishing"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.vae_steps < 1 or args.unet_steps < 1:
        parser.error("--vae-steps and --unet-steps must be at least 1")
    if not 0.0 <= args.uncond_prob < 1.0:
        parser.error("--uncond-prob must be in [0, 1)")
    values = vars(args)
    progress = not values.pop("no_progress")
    return TrainSettings(**values, progress=progress)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: train, print where the model went and how long it took."""
    settings = parse_args(argv)
    began = time.perf_counter()
    result = train(settings)
    total = time.perf_counter() - began
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items())
    if not result.done:
        print(f"stopped early after {total / 60:.1f} min ({stages}); continue with --resume")
        return 0
    print(f"wrote {result.folder} in {total / 60:.1f} min ({stages})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
