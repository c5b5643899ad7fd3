"""Optimization profiles for each component, computed from its declaration and the flags.

Pure logic (no TensorRT): the TensorRT build turns each `ShapeRange` into an optimization
profile through `ComponentSpec.profile`, and the runtime picks among them per call.

Image-sized components (UNet, VAE) get a static profile first, at the model's default size
and batch (min = opt = max, so the runtime can replay CUDA graphs), then a dynamic profile
covering the flag ranges of batch and size when that differs. The text encoders' shapes do
not depend on the image, so they get one profile over the batch range.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kiln_server.engines.buffers import ROWS_PER_IMAGE
from kiln_server.engines.components import ComponentSpec, ShapeRange, ShapeRequest


class ProfileError(ValueError):
    """The requested batch sizes or image sizes are unusable; the message names the flag."""


@dataclass(frozen=True)
class ProfileFlags:
    """What `--batch-sizes`, `--min-size` and `--max-size` asked for (None: not given)."""

    batch_sizes: tuple[int, ...] | None = None
    min_size: int | None = None
    max_size: int | None = None

    def as_args(self) -> list[str]:
        """The flags as `kiln build-engines` arguments (for the manifest's rebuild hint)."""
        args: list[str] = []
        if self.batch_sizes:
            args += ["--batch-sizes", ",".join(str(b) for b in self.batch_sizes)]
        if self.min_size is not None:
            args += ["--min-size", str(self.min_size)]
        if self.max_size is not None:
            args += ["--max-size", str(self.max_size)]
        return args


def check_flags(flags: ProfileFlags, default: ShapeRequest, size_multiple: int) -> None:
    """Raise ProfileError naming the flag when the ranges are unusable for `default`.

    Batch sizes must be positive; sizes positive multiples of `size_multiple`, with
    min-size <= the default height and width <= max-size.
    """
    if flags.batch_sizes is not None and (
        not flags.batch_sizes or any(b < 1 for b in flags.batch_sizes)
    ):
        raise ProfileError("--batch-sizes must list positive integers, e.g. 1,2,4")
    for flag, value in (("--min-size", flags.min_size), ("--max-size", flags.max_size)):
        if value is not None and (value <= 0 or value % size_multiple):
            raise ProfileError(f"{flag} {value} must be a positive multiple of {size_multiple}")
    low = min(default.height, default.width)
    high = max(default.height, default.width)
    if flags.min_size is not None and flags.min_size > low:
        raise ProfileError(f"--min-size {flags.min_size} exceeds the default size {low}")
    if flags.max_size is not None and flags.max_size < high:
        raise ProfileError(f"--max-size {flags.max_size} is below the default size {high}")


def component_profiles(
    spec: ComponentSpec, default: ShapeRequest, flags: ProfileFlags
) -> list[ShapeRange]:
    """The profiles to build for `spec`: static default first, then the dynamic range if any.

    `default.batch` counts images per call; each component's rows are that times its
    ROWS_PER_IMAGE (2 for the UNet under classifier-free guidance). The dynamic profile
    spans 1 row to the largest batch size's rows, and min-size to max-size on both axes
    (defaults: the default batch and size), with the static shape as its optimum.
    """
    per_image = ROWS_PER_IMAGE.get(spec.name, 1)
    sizes: Sequence[int] = flags.batch_sizes or (default.batch,)
    opt_rows = default.batch * per_image
    max_rows = max(max(sizes), default.batch) * per_image
    opt = ShapeRequest(opt_rows, default.height, default.width)
    if not spec.image_sized:
        return [
            ShapeRange(
                min=ShapeRequest(1, default.height, default.width),
                opt=opt,
                max=ShapeRequest(max_rows, default.height, default.width),
            )
        ]
    low, high = flags.min_size, flags.max_size
    dynamic = ShapeRange(
        min=ShapeRequest(
            1,
            low if low is not None else default.height,
            low if low is not None else default.width,
        ),
        opt=opt,
        max=ShapeRequest(
            max_rows,
            high if high is not None else default.height,
            high if high is not None else default.width,
        ),
    )
    static = ShapeRange(min=opt, opt=opt, max=opt)
    return [static] if dynamic == static else [static, dynamic]


def profile_shapes(
    spec: ComponentSpec, ranges: Sequence[ShapeRange]
) -> list[dict[str, tuple[tuple[int, ...], ...]]]:
    """Each profile's (min, opt, max) shape per input, read from the declaration."""
    return [spec.profile(r) for r in ranges]
