"""The engines of one FLUX model on one backend, and the requests they can run.

FluxEngineSet is EngineSet's FLUX counterpart (a transformer instead of a UNet; the text
encoders are CLIP for the pooled embedding and T5). `flux_declared_limits` fills the
shared EngineLimits from the engines themselves, as `declared_limits` does for SDXL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kiln_server.engines.base import Engine
from kiln_server.engines.flux_components import FluxDims
from kiln_server.engines.limits import EngineLimits, engine_shape_ranges, max_batch, merge


@dataclass
class FluxEngineSet:
    """The engines of one FLUX model on one backend: what the FLUX pipeline drives.

    `text_encoder` is the CLIP encoder (pooled output), `text_encoder_2` the T5 encoder.
    Every engine takes inputs on `device` and returns outputs there; `placement` describes
    device and precision for logs and ListModels, `reason` why this backend was chosen.
    FLUX models have no learned preview decoder (`preview_decoder` is always None).
    """

    backend: str
    text_encoder: Engine
    text_encoder_2: Engine
    transformer: Engine
    vae_decoder: Engine
    vae_encoder: Engine | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    placement: str = "cpu fp32"
    reason: str = ""
    preview_decoder: None = None


def flux_declared_limits(engines: FluxEngineSet, dims: FluxDims) -> EngineLimits:
    """The limits of `engines` (a model with `dims`), read from the engines themselves.

    Sizes are multiples of 16 (8x VAE, 2x2 packing) on every backend: the transformer has
    no downsampling of its own. Size bounds come from the VAE engines' optimization
    profiles when they have any (TensorRT); a transformer with profiles is not served yet,
    so one raises NotImplementedError rather than admitting sizes it cannot run.
    `unet_rows` is the most transformer rows per call.
    """
    if engine_shape_ranges(engines.transformer) is not None:
        raise NotImplementedError(
            "FLUX transformer engines with optimization profiles (TensorRT) are not served "
            "yet: their size bounds are not derived"
        )
    bounds: dict[str, int | None] = {
        "min_width": None,
        "max_width": None,
        "min_height": None,
        "max_height": None,
    }
    for engine in (engines.vae_decoder, engines.vae_encoder):
        ranges = engine_shape_ranges(engine) if engine is not None else None
        if ranges is None:
            continue
        # Across profiles an engine accepts the union; across engines, the intersection.
        for key, value, pick in (
            ("min_width", min(low.width for low, _ in ranges), max),
            ("max_width", max(high.width for _, high in ranges), min),
            ("min_height", min(low.height for low, _ in ranges), max),
            ("max_height", max(high.height for _, high in ranges), min),
        ):
            bounds[key] = merge(bounds[key], value, pick)
    text_rows = [
        r for r in (max_batch(engines.text_encoder), max_batch(engines.text_encoder_2)) if r
    ]
    return EngineLimits(
        size_multiple=dims.size_multiple,
        unet_rows=max_batch(engines.transformer),
        vae_decoder_images=max_batch(engines.vae_decoder),
        vae_encoder_images=max_batch(engines.vae_encoder),
        text_encoder_prompts=min(text_rows) if text_rows else None,
        image_inputs=engines.vae_encoder is not None,
        distilled_guidance=dims.guidance_embeds,
        min_width=bounds["min_width"],
        max_width=bounds["max_width"],
        min_height=bounds["min_height"],
        max_height=bounds["max_height"],
    )
