"""The engines of one FLUX model on one backend, and the requests they can run.

FluxEngineSet is EngineSet's FLUX counterpart (a transformer instead of a UNet; the text
encoders are CLIP for the pooled embedding and T5). `flux_declared_limits` fills the
shared EngineLimits from the engines themselves, as `declared_limits` does for SDXL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kiln_server.engines.base import Engine, EngineError
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
    profiles when they have any (TensorRT). A transformer's profiles bound its token count
    only, so they must cover every size the VAE bounds admit: engines built from one plan
    do, and others raise EngineError naming the rebuild. `unet_rows` is the most
    transformer rows per call.
    """
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
    _check_transformer_tokens(engines.transformer, dims, bounds)
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


def _check_transformer_tokens(
    transformer: Engine, dims: FluxDims, bounds: dict[str, int | None]
) -> None:
    """EngineError unless the transformer's profiles (if any) take the token count of every
    image size within `bounds` (the VAE's)."""
    ranges = engine_shape_ranges(transformer)
    if ranges is None:
        return
    # A transformer call's request is a one-token-wide image (FluxComponentSpec.request_for).
    low_tokens = min(low.height for low, _ in ranges) // dims.size_multiple
    high_tokens = max(high.height for _, high in ranges) // dims.size_multiple
    sides = (bounds["min_height"], bounds["min_width"], bounds["max_height"], bounds["max_width"])
    if any(side is None for side in sides):
        raise EngineError(
            "the FLUX transformer engine has optimization profiles but its VAE engines have "
            "none, so the image sizes it runs are unknown; rebuild every engine with "
            "`kiln build-engines --format tensorrt`"
        )
    min_h, min_w, max_h, max_w = (int(side or 0) for side in sides)
    need_low, need_high = dims.image_tokens(min_h, min_w), dims.image_tokens(max_h, max_w)
    if need_low < low_tokens or need_high > high_tokens:
        raise EngineError(
            f"the FLUX transformer engine runs {low_tokens}-{high_tokens} image tokens but the "
            f"VAE engines' sizes ({min_w}x{min_h} to {max_w}x{max_h}) need "
            f"{need_low}-{need_high}: the engines were built from different profiles; "
            "rebuild them together with `kiln build-engines --format tensorrt`"
        )
