"""What a loaded engine set can run: the capability contract validation and batching read.

Each backend has its own bounds. Eager torch runs any size that is a multiple of the VAE's
scale factor and any batch. Exported graphs (onnxruntime, TensorRT) fix the UNet's
upsampling shapes at export, so they need the latent side to divide by every
downsampling: a multiple of `ModelDims.graph_size_multiple` pixels. TensorRT engines add
their optimization profiles' size and batch ranges. `declared_limits` derives the
declaration from the engines themselves, so nothing is admitted that they cannot run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kiln_server.engines.base import Engine, EngineSet
from kiln_server.engines.buffers import request_from_shapes
from kiln_server.engines.components import ModelDims, ShapeRequest

# Preview method names, as ListModels reports them and PreviewParams carries them.
PREVIEW_LATENT_RGB = "latent_rgb"
PREVIEW_DECODER = "decoder"


@dataclass(frozen=True)
class EngineLimits:
    """The requests an engine set can run. None means the engines set no bound.

    Sizes are in pixels. `unet_rows` is the most UNet rows one call takes (two per image
    under classifier-free guidance); `vae_decoder_images` and `vae_encoder_images` the most
    images one VAE call takes (the pipeline decodes larger requests in chunks of that
    many); `text_encoder_prompts` the most prompts one text-encoder call takes.
    `preview_decoder` says whether the set has a learned preview decoder (the one fact
    validation and ListModels read to offer the "decoder" preview method), and
    `preview_decoder_images` the most images one call of it takes. `image_inputs` says
    whether the set has a VAE encoder (image conditioning needs one) and `inpainting`
    whether its UNet is an inpainting UNet (it runs only requests with image and mask).
    `distilled_guidance` says that guidance_scale is an input of the denoiser (FLUX-dev)
    rather than classifier-free guidance over two rows.
    """

    size_multiple: int
    min_width: int | None = None
    max_width: int | None = None
    min_height: int | None = None
    max_height: int | None = None
    unet_rows: int | None = None
    vae_decoder_images: int | None = None
    vae_encoder_images: int | None = None
    text_encoder_prompts: int | None = None
    preview_decoder: bool = False
    preview_decoder_images: int | None = None
    image_inputs: bool = False
    inpainting: bool = False
    # FLUX-dev style: guidance_scale feeds a guidance embedding (one row per image)
    # instead of classifier-free guidance.
    distilled_guidance: bool = False

    @property
    def preview_methods(self) -> tuple[str, ...]:
        """Preview methods these engines serve, the default (best) first."""
        if self.preview_decoder:
            return (PREVIEW_DECODER, PREVIEW_LATENT_RGB)
        return (PREVIEW_LATENT_RGB,)

    def size_range(self, axis: str) -> tuple[int | None, int | None]:
        """(min, max) pixels along `axis` ('width' or 'height')."""
        if axis == "width":
            return self.min_width, self.max_width
        return self.min_height, self.max_height

    def describe(self) -> str:
        """One line for the start-up log, e.g. 'sizes 256-2048 in steps of 32, UNet rows 16'."""

        def bound(low: int | None, high: int | None) -> str:
            return f"{low or 'any'}-{high or 'any'}"

        parts = [
            f"width {bound(self.min_width, self.max_width)}",
            f"height {bound(self.min_height, self.max_height)}",
            f"multiple of {self.size_multiple}",
        ]
        for label, value in (
            ("UNet rows", self.unet_rows),
            ("VAE decoder images", self.vae_decoder_images),
            ("text encoder prompts", self.text_encoder_prompts),
        ):
            parts.append(f"{label} {value if value is not None else 'any'}")
        if self.preview_decoder:
            images = self.preview_decoder_images
            parts.append(f"preview decoder images {images if images is not None else 'any'}")
        else:
            parts.append("no preview decoder")
        return ", ".join(parts)


def engine_shape_ranges(engine: Engine) -> list[tuple[ShapeRequest, ShapeRequest]] | None:
    """(smallest, largest) call of each optimization profile, or None for any shape.

    Engines with profiles (TensorRT) expose them as `profiles`: for each, the (min, opt,
    max) shape of every input, from which the declaration's symbolic dims are solved.
    """
    profiles: Any = getattr(engine, "profiles", None)
    if not profiles:
        return None
    ranges = []
    for profile in profiles:
        low = request_from_shapes(engine.spec, {name: b[0] for name, b in profile.items()})
        high = request_from_shapes(engine.spec, {name: b[2] for name, b in profile.items()})
        ranges.append((low, high))
    return ranges


def max_batch(engine: Engine | None) -> int | None:
    """The most rows one call of `engine` takes (None: no engine, or any)."""
    if engine is None:
        return None
    return engine.max_batch


def merge(current: int | None, value: int, pick: Any) -> int:
    """`value` combined into a running bound with `pick` (min or max); None starts it."""
    return value if current is None else int(pick(current, value))


def declared_limits(engines: EngineSet, dims: ModelDims) -> EngineLimits:
    """The limits of `engines` (a model with `dims`), read from the engines themselves.

    Image sizes are bounded by the UNet's, the VAE decoder's and (when present) the preview
    decoder's profiles together: a size any of them cannot run is refused. The size
    multiple is the VAE scale factor for eager torch, and the graphs' multiple for
    exported backends.
    """
    multiple = dims.vae_scale_factor if engines.backend == "torch" else dims.graph_size_multiple
    bounds: dict[str, int | None] = {
        "min_width": None,
        "max_width": None,
        "min_height": None,
        "max_height": None,
    }
    per_component: Mapping[str, Engine] = {"unet": engines.unet, "vae_decoder": engines.vae_decoder}
    for name in ("preview_decoder", "vae_encoder"):
        # Built over the VAE decoder's ranges; a size they could not run is refused too.
        engine = getattr(engines, name)
        if engine is not None:
            per_component = {**per_component, name: engine}
    for engine in per_component.values():
        ranges = engine_shape_ranges(engine)
        if ranges is None:
            continue
        # Across profiles the engine accepts the union; across components, the intersection.
        low_w = min(low.width for low, _ in ranges)
        high_w = max(high.width for _, high in ranges)
        low_h = min(low.height for low, _ in ranges)
        high_h = max(high.height for _, high in ranges)
        bounds["min_width"] = merge(bounds["min_width"], low_w, max)
        bounds["max_width"] = merge(bounds["max_width"], high_w, min)
        bounds["min_height"] = merge(bounds["min_height"], low_h, max)
        bounds["max_height"] = merge(bounds["max_height"], high_h, min)
    text_rows = [
        r for r in (max_batch(engines.text_encoder), max_batch(engines.text_encoder_2)) if r
    ]
    return EngineLimits(
        size_multiple=multiple,
        unet_rows=max_batch(engines.unet),
        vae_decoder_images=max_batch(engines.vae_decoder),
        vae_encoder_images=max_batch(engines.vae_encoder),
        text_encoder_prompts=min(text_rows) if text_rows else None,
        preview_decoder=engines.preview_decoder is not None,
        preview_decoder_images=max_batch(engines.preview_decoder),
        image_inputs=engines.vae_encoder is not None,
        inpainting=dims.inpainting,
        min_width=bounds["min_width"],
        max_width=bounds["max_width"],
        min_height=bounds["min_height"],
        max_height=bounds["max_height"],
    )
