"""Distil a model's learned preview decoder (a tiny diffusers AutoencoderTiny).

    .venv/bin/python -m kiln_training.preview_decoder --model models/kiln-shapes --threads 1

The decoder imitates the model's own VAE decoder on latents of the model's own generations:
Kiln's pipeline generates images for prompts from the training vocabulary, and every step's
predicted clean latents (`pred_original_sample`, what a step preview decodes) plus the final
latents become training inputs; the VAE's images of the same latents are the targets. The
decoder reads the denoising loop's latents as they are (already multiplied by the VAE's
`scaling_factor`) and returns the image in [-1, 1] at full size, like
`AutoencoderTiny.decode(latents).sample`. It is written, fp16, to `<model>/preview_decoder/`
and the run's settings go into the model's kiln.json under `preview_decoder_training`.

The module also holds the closeness measure the benchmark and tests share: how far a
preview's background and shape colours and its pixels are from the final image's.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from kiln_server.pipeline.sdxl import to_uint8_pixels
from kiln_training.dataset import COLOURS, caption, sample_scenes
from kiln_training.evaluate import judge

SUBFOLDER = "preview_decoder"
SETTINGS_KEY = "preview_decoder_training"
# Scenes for training prompts are drawn from their own seed stream, apart from the balanced
# evaluation prompt set (dataset.prompt_set), so the evaluation does not replay training.
PROMPT_SEED_OFFSET = 1_000


@dataclass(frozen=True)
class DecoderSettings:
    """Everything that determines a distillation run (recorded in the model's kiln.json)."""

    seed: int = 0
    threads: int = 1
    prompts: int = 128
    seeds_per_prompt: int = 2
    train_steps: int = 4000
    batch: int = 32
    lr: float = 0.004
    channels: int = 16
    # No blocks at the two highest resolutions: those convolutions cost most of a preview,
    # and a pooled-colour loss over more generations buys back what they added.
    blocks: tuple[int, int, int, int] = (1, 1, 0, 0)
    generation_batch: int = 64
    # Weight of the L1 on 8x8-pooled images, beside the pixel L1 (0: pixels alone).
    colour_weight: float = 0.5


@dataclass
class DistilResult:
    """What a run produced: the trained decoder (float32), its losses and stage times."""

    decoder: Any
    first_loss: float
    last_loss: float
    samples: int
    seconds: dict[str, float] = field(default_factory=dict)
    folder: Path | None = None


@dataclass(frozen=True)
class Closeness:
    """How far a preview is from the final image.

    `background` and `shape`: the largest per-channel difference (0-255 levels) between the
    mean colours of the preview and the final image over the final image's background and
    shape pixels (NaN when the final image shows no shape); `psnr`: dB over all pixels.
    """

    background: float
    shape: float
    psnr: float


def make_decoder(settings: DecoderSettings) -> Any:
    """A freshly initialised AutoencoderTiny with the settings' decoder and a token encoder.

    The encoder is never used (previews only decode), so it is kept as small as the class
    allows.
    """
    from diffusers import AutoencoderTiny

    torch.manual_seed(settings.seed)
    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        decoder_block_out_channels=(settings.channels,) * 4,
        num_decoder_blocks=settings.blocks,
    )


def load_decoder(folder: Path) -> Any:
    """The AutoencoderTiny in `folder` (a model's preview_decoder/), float32, eval mode."""
    from diffusers import AutoencoderTiny

    decoder = AutoencoderTiny.from_pretrained(str(folder), torch_dtype=torch.float32)
    return decoder.eval()


def decode_to_uint8(decoder: Any, latents: torch.Tensor) -> torch.Tensor:
    """The decoder's images of UNet-space latents as uint8 [N, H, W, 3] (a preview's cost)."""
    return to_uint8_pixels(decoder.decode(latents).sample).permute(0, 2, 3, 1).contiguous()


def load_pipeline(model: Path) -> Any:
    """Kiln's SDXL pipeline over the model folder on the torch backend."""
    from kiln_training.sampling import KilnSampler

    return KilnSampler(model, backend="torch").pipeline


def generation_latents(
    pipeline: Any, prompts: Sequence[str], seeds: Sequence[int], progress: bool = True
) -> torch.Tensor:
    """Every step's predicted clean latents and the final latents of the generations
    (prompt, seed) at the model's defaults: [len(prompts) * (steps + 1), C, h, w].

    All requests of a chunk advance together, one UNet call a step, as the server batches.
    """
    from kiln_server.pipeline.params import GenerationParams

    defaults = pipeline.files.kiln_config
    size = int(defaults.get("default_width", 64))
    steps = int(defaults.get("default_num_inference_steps", 20))
    chunk = DecoderSettings.generation_batch
    collected: list[torch.Tensor] = []
    bar = tqdm(total=len(prompts) * steps, desc="generations", unit="step", disable=not progress)
    with torch.inference_mode():
        for start in range(0, len(prompts), chunk):
            states = [
                pipeline.prepare(
                    GenerationParams(
                        prompt=prompt,
                        width=size,
                        height=int(defaults.get("default_height", size)),
                        num_inference_steps=steps,
                        guidance_scale=float(defaults.get("default_guidance_scale", 5.0)),
                        scheduler=str(defaults.get("default_scheduler", "K_EULER")),
                        seed=int(seed),
                    )
                )
                for prompt, seed in zip(
                    prompts[start : start + chunk], seeds[start : start + chunk], strict=True
                )
            ]
            while not all(state.finished for state in states):
                pipeline.denoise_step(states)
                collected.extend(state.denoised for state in states if state.denoised is not None)
                bar.update(len(states))
            collected.extend(state.latents for state in states)
    bar.close()
    return torch.cat(collected).float().cpu()


def vae_images(pipeline: Any, latents: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """The model's VAE decoder's images in [-1, 1] of UNet-space latents (the targets)."""
    scaling = pipeline.files.vae_scaling_factor
    with torch.inference_mode():
        pieces = [
            pipeline.engines.vae_decoder.infer({"latent": part / scaling})["images"].float()
            for part in latents.split(chunk)
        ]
    return torch.cat(pieces).cpu()


def train_decoder(
    decoder: Any,
    latents: torch.Tensor,
    targets: torch.Tensor,
    settings: DecoderSettings,
    progress: bool = True,
) -> tuple[float, float]:
    """Fit the decoder to the targets by L1 in [-1, 1]; returns the mean loss of the first
    and of the last 10% of steps. Batches come from a generator seeded by the settings."""
    generator = torch.Generator().manual_seed(settings.seed)
    params = list(decoder.decoder.parameters())
    optimiser = torch.optim.Adam(params, lr=settings.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * step / settings.train_steps))
    )
    decoder.train()
    losses: list[float] = []
    bar = tqdm(range(settings.train_steps), desc="decoder", unit="step", disable=not progress)
    for _ in bar:
        index = torch.randint(len(latents), (settings.batch,), generator=generator)
        prediction = decoder.decode(latents[index]).sample
        target = targets[index]
        loss = torch.nn.functional.l1_loss(prediction, target)
        if settings.colour_weight:
            # Previews are judged by their regions' colours: L1 on 8x8-pooled images weighs
            # the mean colours over edge detail.
            pooled = torch.nn.functional.avg_pool2d
            loss = loss + settings.colour_weight * torch.nn.functional.l1_loss(
                pooled(prediction, 8), pooled(target, 8)
            )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if len(losses) % 50 == 0:
            bar.set_postfix(l1=f"{np.mean(losses[-50:]):.4f}")
    decoder.eval()
    tenth = max(1, len(losses) // 10)
    return float(np.mean(losses[:tenth])), float(np.mean(losses[-tenth:]))


def training_prompts(settings: DecoderSettings) -> tuple[list[str], list[int]]:
    """Prompts from the model's vocabulary, each with `seeds_per_prompt` seeds."""
    scenes = sample_scenes(settings.prompts, settings.seed + PROMPT_SEED_OFFSET)
    prompts = [caption(scene) for scene in scenes for _ in range(settings.seeds_per_prompt)]
    seeds = [
        settings.seed * 10_000 + i * settings.seeds_per_prompt + k
        for i in range(settings.prompts)
        for k in range(settings.seeds_per_prompt)
    ]
    return prompts, seeds


def save_decoder(decoder: Any, model: Path) -> Path:
    """Write the decoder fp16 into `<model>/preview_decoder/`, replacing it atomically."""
    import copy

    from kiln_server.models.layout import staged_folder

    folder = Path(model) / SUBFOLDER
    with staged_folder(folder) as staging:
        copy.deepcopy(decoder).half().save_pretrained(str(staging), safe_serialization=True)
        # diffusers records a legacy alias of the encoder's channels that it then warns
        # about on every load; the decoder never reads it.
        config_path = staging / "config.json"
        config = json.loads(config_path.read_text())
        config.pop("block_out_channels", None)
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    return folder


def record_settings(model: Path, settings: DecoderSettings, result: DistilResult) -> None:
    """Add (or replace) the run's settings and results in the model's kiln.json; every other
    key stays as it was."""
    path = Path(model) / "kiln.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    config[SETTINGS_KEY] = {
        **asdict(settings),
        "blocks": list(settings.blocks),
        "samples": result.samples,
        "first_l1": round(result.first_loss, 5),
        "last_l1": round(result.last_loss, 5),
        "seconds": {k: round(v, 1) for k, v in result.seconds.items()},
    }
    staged = path.with_name(".kiln.json.tmp")
    staged.write_text(json.dumps(config, indent=2) + "\n")
    staged.replace(path)


def distil(
    model: Path,
    settings: DecoderSettings = DecoderSettings(),
    *,
    out: Path | None = None,
    progress: bool = True,
    pipeline: Any = None,
) -> DistilResult:
    """Generate, decode with the VAE, train the preview decoder, and (when `out` is given)
    write it into `out` (a model folder) with its settings in kiln.json."""
    torch.set_num_threads(settings.threads)
    seconds: dict[str, float] = {}
    began = time.perf_counter()
    pipeline = pipeline if pipeline is not None else load_pipeline(Path(model))
    prompts, seeds = training_prompts(settings)
    latents = generation_latents(pipeline, prompts, seeds, progress)
    seconds["generate"] = time.perf_counter() - began

    began = time.perf_counter()
    targets = vae_images(pipeline, latents)
    seconds["vae"] = time.perf_counter() - began

    began = time.perf_counter()
    decoder = make_decoder(settings)
    first, last = train_decoder(decoder, latents, targets, settings, progress)
    seconds["train"] = time.perf_counter() - began
    result = DistilResult(decoder, first, last, len(latents), seconds)
    if out is not None:
        result.folder = save_decoder(decoder, Path(out))
        record_settings(Path(out), settings, result)
    return result


def closeness(preview: np.ndarray, final: np.ndarray) -> Closeness:
    """Compare a preview (uint8 RGB, already at the final image's size) with the final image.

    The background and shape regions are read from the final image with the pixel judge of
    kiln_training.evaluate: pixels whose nearest palette colour is the judged background
    (or shape) colour.
    """
    ref = np.asarray(final, dtype=np.float64)[..., :3]
    seen = np.asarray(preview, dtype=np.float64)[..., :3]
    seen_as = judge(final)
    names = list(COLOURS)
    palette = np.asarray([COLOURS[name] for name in names], dtype=np.float64)
    nearest = np.linalg.norm(ref[:, :, None] - palette[None, None], axis=-1).argmin(axis=-1)

    def region_error(name: str | None) -> float:
        if name is None:
            return float("nan")
        mask = nearest == names.index(name)
        if not mask.any():
            return float("nan")
        return float(np.abs(seen[mask].mean(axis=0) - ref[mask].mean(axis=0)).max())

    mse = float(np.mean((seen - ref) ** 2))
    psnr = float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)
    return Closeness(region_error(seen_as.background), region_error(seen_as.colour), psnr)


def mean_closeness(items: Sequence[Closeness]) -> Closeness:
    """Means over images (NaN entries, images without a shape, are skipped)."""
    return Closeness(
        float(np.nanmean([c.background for c in items])),
        float(np.nanmean([c.shape for c in items])),
        float(np.mean([c.psnr for c in items])),
    )


def linear_preview(previewer: Any, latents: torch.Tensor, size: int) -> list[np.ndarray]:
    """The linear latent-to-RGB previews of latents [N, C, h, w], each scaled to `size`
    square the way the server scales previews (bilinear), as uint8 arrays."""
    from PIL import Image

    images = []
    for latent in latents:
        pixels = previewer.to_rgb(latent[None]).cpu().numpy()
        image = Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR)
        images.append(np.asarray(image))
    return images


@dataclass(frozen=True)
class PreviewComparison:
    """Mean closeness of the last step's previews to the final images, per method."""

    linear: Closeness
    decoder: Closeness
    images: int


def compare_previews(
    pipeline: Any, decoder: Any, prompts: Sequence[str], seeds: Sequence[int]
) -> PreviewComparison:
    """Generate (prompt, seed) at the model's defaults and compare each method's preview of
    the last step's predicted clean latents with the final image, at the final image's
    size (a kiln-shapes preview is never larger)."""
    from kiln_server.pipeline.previews import LatentPreviewer

    settings = DecoderSettings()
    latents = generation_latents(pipeline, prompts, seeds, progress=False)
    steps = len(latents) // len(prompts) - 1
    # generation_latents lays out chunk by chunk: every step of a chunk, then its finals.
    last: list[torch.Tensor] = []
    finals: list[torch.Tensor] = []
    offset = 0
    for start in range(0, len(prompts), settings.generation_batch):
        n = len(prompts[start : start + settings.generation_batch])
        block = latents[offset : offset + n * (steps + 1)]
        last.append(block[(steps - 1) * n : steps * n])
        finals.append(block[steps * n :])
        offset += n * (steps + 1)
    last_step, final_latents = torch.cat(last), torch.cat(finals)
    finals_rgb = ((vae_images(pipeline, final_latents) / 2 + 0.5).clamp(0, 1) * 255).round()
    final_images = finals_rgb.to(torch.uint8).permute(0, 2, 3, 1).numpy()
    size = final_images.shape[1]
    linear = linear_preview(LatentPreviewer.for_model(pipeline.files.kiln_config), last_step, size)
    with torch.inference_mode():
        learned = decode_to_uint8(decoder, last_step).numpy()
    return PreviewComparison(
        linear=mean_closeness([closeness(p, f) for p, f in zip(linear, final_images, strict=True)]),
        decoder=mean_closeness(
            [closeness(p, f) for p, f in zip(learned, final_images, strict=True)]
        ),
        images=len(prompts),
    )


def parse_args(argv: Sequence[str] | None = None) -> tuple[Path, Path, DecoderSettings]:
    """Model folder, output folder and settings from the command line."""
    defaults = DecoderSettings()
    parser = argparse.ArgumentParser(
        prog="python -m kiln_training.preview_decoder", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", type=Path, default=Path("models/kiln-shapes"))
    parser.add_argument("--out", type=Path, help="model folder to write into (default --model)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--threads", type=int, default=defaults.threads, help="torch.set_num_threads value"
    )
    parser.add_argument("--prompts", type=int, default=defaults.prompts)
    parser.add_argument("--seeds-per-prompt", type=int, default=defaults.seeds_per_prompt)
    parser.add_argument("--train-steps", type=int, default=defaults.train_steps)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--channels", type=int, default=defaults.channels)
    parser.add_argument(
        "--colour-weight",
        type=float,
        default=defaults.colour_weight,
        help="weight of an L1 on 8x8-pooled images (region colours) beside the pixel L1",
    )
    parser.add_argument(
        "--blocks",
        type=int,
        nargs=4,
        default=list(defaults.blocks),
        help="AutoencoderTiny blocks per decoder level (lowest resolution first)",
    )
    args = parser.parse_args(argv)
    settings = DecoderSettings(
        seed=args.seed,
        threads=args.threads,
        prompts=args.prompts,
        seeds_per_prompt=args.seeds_per_prompt,
        train_steps=args.train_steps,
        batch=args.batch,
        lr=args.lr,
        channels=args.channels,
        blocks=tuple(args.blocks),
        colour_weight=args.colour_weight,
    )
    return args.model, args.out or args.model, settings


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: distil, write, print the losses and the wall time."""
    model, out, settings = parse_args(argv)
    began = time.perf_counter()
    result = distil(model, settings, out=out)
    total = time.perf_counter() - began
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items())
    print(
        f"wrote {result.folder} in {total / 60:.1f} min ({stages}); "
        f"L1 {result.first_loss:.4f} -> {result.last_loss:.4f} on {result.samples} latents"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
