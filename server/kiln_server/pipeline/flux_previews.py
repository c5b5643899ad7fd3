"""The latent-to-RGB preview map of a FLUX-family model (16 latent channels).

SDXL's fixed 4x3 factors do not apply to FLUX's 16-channel latents. A model folder may
carry fitted factors in kiln.json (`latent_rgb_factors` 16x3, `latent_rgb_bias` 3); without
them the map is derived from the model's own VAE decoder: seeded unit-variance latents in
the denoiser's scaled space are decoded, the images averaged over each latent pixel's
footprint, and the linear map from a latent pixel to that mean colour fitted by least
squares. The fit is deterministic (fixed seed) and costs one small VAE decode at load.
"""

from __future__ import annotations

import torch

from kiln_server.engines.base import Engine
from kiln_server.engines.flux_engines import FluxEngineSet
from kiln_server.models.flux_loader import FluxModelFiles
from kiln_server.pipeline.previews import LatentPreviewer

FIT_SEED = 0
FIT_IMAGES = 8
# Latent pixels per side of each fitting image: 8 x 8 x FIT_IMAGES = 512 samples for 17
# unknowns.
FIT_LATENT_SIZE = 8


def fit_latent_rgb(
    files: FluxModelFiles, decoder: Engine, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(factors [C, 3], bias [3]) mapping a scaled latent pixel to its decoded mean colour
    in [-1, 1], fitted on the model's VAE `decoder` engine (inputs on `device`), one image
    per call."""
    channels = files.dims.latent_channels
    generator = torch.Generator().manual_seed(FIT_SEED)
    latents = torch.randn(
        (FIT_IMAGES, channels, FIT_LATENT_SIZE, FIT_LATENT_SIZE), generator=generator
    )
    images = []
    for latent in latents.split(1):
        unscaled = latent / files.vae_scaling_factor + files.vae_shift_factor
        decoded = decoder.infer({"latent": unscaled.to(device)})["images"]
        images.append(decoded.float().cpu())
    colours = torch.nn.functional.avg_pool2d(torch.cat(images), files.dims.vae_scale_factor)
    inputs = latents.permute(0, 2, 3, 1).reshape(-1, channels)
    inputs = torch.cat([inputs, torch.ones(inputs.shape[0], 1)], dim=1)
    targets = colours.permute(0, 2, 3, 1).reshape(-1, colours.shape[1])
    solution = torch.linalg.lstsq(inputs.double(), targets.double()).solution.float()
    return solution[:channels], solution[channels]


def flux_previewer(files: FluxModelFiles, engines: FluxEngineSet) -> LatentPreviewer:
    """The model's preview map: kiln.json's fitted factors when it has them, else the map
    fitted on its VAE decoder."""
    factors = files.kiln_config.get("latent_rgb_factors")
    bias = files.kiln_config.get("latent_rgb_bias")
    if factors is not None and bias is not None:
        return LatentPreviewer(factors, bias)
    fitted_factors, fitted_bias = fit_latent_rgb(files, engines.vae_decoder, engines.device)
    return LatentPreviewer(fitted_factors.tolist(), fitted_bias.tolist())
