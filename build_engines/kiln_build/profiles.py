"""Optimization profiles for each component, computed from its declaration and the flags.

Pure logic (no TensorRT): the TensorRT build turns each `ShapeRange` into an optimization
profile through `ComponentSpec.profile`, and the runtime picks among them per call. A
server serving the engines refuses, before any work, every request outside these ranges,
so the defaults cover every request the model's own limits allow:

- UNet (SDXL) or transformer (FLUX): up to the model's `max_num_outputs` images per call,
  two rows each under classifier-free guidance (16 rows for SDXL's default of 8 images),
  one each for a FLUX model with distilled guidance;
- text encoders: one request's prompts per call (prompt and negative prompt: 2 rows);
- VAE decoder and encoder, and the learned preview decoder: `--vae-batch` images per call
  (default 1); the pipeline decodes larger requests (and previews) in chunks of that many;
- sizes: the model's min_size (rounded up to the multiple the exported graphs need,
  `ModelDims.graph_size_multiple`) to its default size; `--max-size` reaches further.

Image-sized components (UNet, VAE, preview decoder) get a static profile first, at the
model's default size and one image (min = opt = max, so the runtime can replay CUDA
graphs), then the dynamic profile over the whole range with the static shape as its
optimum. The text encoders' shapes do not depend on the image, so they get one profile
over their rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kiln_server.engines.components import ComponentSpec, ShapeRange, ShapeRequest
from kiln_server.engines.flux_components import FluxComponentSpec
from kiln_server.pipeline.families import most_rows_per_image, rows_per_image

# The components that denoise: SDXL's UNet, FLUX's transformer.
DENOISERS = ("unet", "transformer")
# Rows one text-encoder call gets at most: a request's prompt and its negative prompt,
# encoded once per request whatever its number of images (today one text per call).
TEXT_ROWS_PER_REQUEST = 2
# One fp32 SDXL VAE image at 1024x1024 peaks at several GB; requests decode in chunks.
DEFAULT_VAE_BATCH = 1


class ProfileError(ValueError):
    """The requested batch sizes or image sizes are unusable; the message names the flag."""


@dataclass(frozen=True)
class ModelLimits:
    """The request limits of the model the engines serve (from its registry entry), and
    the guidance its default request runs (which fixes the static profile's rows)."""

    min_size: int = 256
    max_size: int = 2048
    max_num_outputs: int = 8
    default_guidance_scale: float = 7.5
    default_negative_prompt: bool = False

    @classmethod
    def of(cls, spec: Any) -> ModelLimits:
        """The limits of a registry ModelSpec."""
        return cls(
            spec.min_size,
            spec.max_size,
            spec.max_num_outputs,
            spec.default_guidance_scale,
            spec.default_negative_prompt is not None,
        )


@dataclass(frozen=True)
class ProfileFlags:
    """What `--batch-sizes`, `--min-size`, `--max-size`, `--vae-batch` asked (None: not given)."""

    batch_sizes: tuple[int, ...] | None = None
    min_size: int | None = None
    max_size: int | None = None
    vae_batch: int | None = None

    def as_args(self) -> list[str]:
        """The flags as `kiln build-engines` arguments (for the manifest's rebuild hint)."""
        args: list[str] = []
        if self.batch_sizes:
            args += ["--batch-sizes", ",".join(str(b) for b in self.batch_sizes)]
        if self.min_size is not None:
            args += ["--min-size", str(self.min_size)]
        if self.max_size is not None:
            args += ["--max-size", str(self.max_size)]
        if self.vae_batch is not None:
            args += ["--vae-batch", str(self.vae_batch)]
        return args


@dataclass(frozen=True)
class ProfilePlan:
    """The resolved ranges every component's profiles are built from.

    `default` is one image at the model's default size; `images` the most images one
    denoiser call takes; `vae_images` the most one VAE call takes; `min_size`..`max_size`
    the image sides, multiples of `size_multiple`; `limits` the model's, whose default
    guidance decides the denoiser rows of the static profile.
    """

    default: ShapeRequest
    images: int
    vae_images: int
    min_size: int
    max_size: int
    size_multiple: int
    limits: ModelLimits = ModelLimits()


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def resolve_plan(
    flags: ProfileFlags, default: ShapeRequest, limits: ModelLimits, size_multiple: int
) -> ProfilePlan:
    """The ranges to build for: the flags where given, else the model's limits.

    Sizes default to the model's min_size (rounded up to `size_multiple`) up to its
    default size: every request the model's defaults allow, and smaller ones; larger sizes
    need `--max-size`. Denoiser images default to its max_num_outputs, VAE images to
    DEFAULT_VAE_BATCH.
    Raises ProfileError naming the flag when a value is unusable: batch sizes not positive,
    sizes not positive multiples of `size_multiple`, a range that excludes the default size,
    or a default size the graphs cannot run.
    """
    if flags.batch_sizes is not None and (
        not flags.batch_sizes or any(b < 1 for b in flags.batch_sizes)
    ):
        raise ProfileError("--batch-sizes must list positive integers, e.g. 1,2,4")
    if flags.vae_batch is not None and flags.vae_batch < 1:
        raise ProfileError(f"--vae-batch {flags.vae_batch} must be a positive integer")
    for flag, value in (("--min-size", flags.min_size), ("--max-size", flags.max_size)):
        if value is not None and (value <= 0 or value % size_multiple):
            raise ProfileError(f"{flag} {value} must be a positive multiple of {size_multiple}")
    for side in (default.height, default.width):
        if side % size_multiple:
            raise ProfileError(
                f"the model's default size {default.width}x{default.height} is not a multiple "
                f"of {size_multiple}, which its exported graphs need; set default_width "
                "and default_height to multiples of it"
            )
    low = min(default.height, default.width)
    high = max(default.height, default.width)
    min_size = flags.min_size
    if min_size is None:
        min_size = min(_round_up(limits.min_size, size_multiple), low)
    max_size = flags.max_size
    if max_size is None:
        # The default size, not the model's max_size: each profile's largest shape sizes
        # the scratch memory every engine shares, and 16 UNet rows at 2048x2048 (or fp32
        # VAE images at that size) would claim tens of GB even when only 1024x1024 runs.
        max_size = high
    if min_size > low:
        raise ProfileError(f"--min-size {min_size} exceeds the default size {low}")
    if max_size < high:
        raise ProfileError(f"--max-size {max_size} is below the default size {high}")
    images = max(flags.batch_sizes) if flags.batch_sizes else max(limits.max_num_outputs, 1)
    return ProfilePlan(
        default=ShapeRequest(1, default.height, default.width),
        images=images,
        vae_images=flags.vae_batch if flags.vae_batch is not None else DEFAULT_VAE_BATCH,
        min_size=min_size,
        max_size=max_size,
        size_multiple=size_multiple,
        limits=limits,
    )


def image_rows(spec: ComponentSpec, plan: ProfilePlan) -> tuple[int, int]:
    """(default, most) rows one image takes in a call of `spec`'s component: for a denoiser
    the rows of the model's default request and the most any request takes
    (pipeline.families counts them), 1 and 1 for every other component."""
    if spec.name not in DENOISERS:
        return 1, 1
    family, distilled = ("sdxl", False)
    if isinstance(spec, FluxComponentSpec):
        family, distilled = "flux", spec.flux.guidance_embeds
    default = rows_per_image(
        family,
        distilled_guidance=distilled,
        guidance_scale=plan.limits.default_guidance_scale,
        negative_prompt=plan.limits.default_negative_prompt,
    )
    return default, most_rows_per_image(family, distilled_guidance=distilled)


def max_rows(spec: ComponentSpec, plan: ProfilePlan) -> int:
    """The most rows one call of `spec`'s component takes under `plan`."""
    if spec.name in DENOISERS:
        return plan.images * image_rows(spec, plan)[1]
    if spec.name.startswith("text_encoder"):
        return TEXT_ROWS_PER_REQUEST
    return plan.vae_images


def component_profiles(spec: ComponentSpec, plan: ProfilePlan) -> list[ShapeRange]:
    """The profiles to build for `spec`: static default first, then the dynamic range.

    The static profile is one image at the default size, with the denoiser rows the
    model's default request takes (2 under guidance; 1 VAE image); the dynamic one spans 1
    row to `max_rows` and min_size to max_size on both sides, with the static shape as its
    optimum. Text encoders get one profile of 1 to TEXT_ROWS_PER_REQUEST rows.
    """
    default = plan.default
    top = max_rows(spec, plan)
    if not spec.image_sized:
        opt = ShapeRequest(top, default.height, default.width)
        return [ShapeRange(min=ShapeRequest(1, default.height, default.width), opt=opt, max=opt)]
    opt = ShapeRequest(min(image_rows(spec, plan)[0], top), default.height, default.width)
    static = ShapeRange(min=opt, opt=opt, max=opt)
    dynamic = ShapeRange(
        min=ShapeRequest(1, plan.min_size, plan.min_size),
        opt=opt,
        max=ShapeRequest(top, plan.max_size, plan.max_size),
    )
    return [static] if dynamic == static else [static, dynamic]


def profile_shapes(
    spec: ComponentSpec, ranges: Sequence[ShapeRange]
) -> list[dict[str, tuple[tuple[int, ...], ...]]]:
    """Each profile's (min, opt, max) shape per input, read from the declaration."""
    return [spec.profile(r) for r in ranges]
