"""Judge an image against its prompt from the pixels alone.

`judge` reads an RGB image of a shapes scene and says which background colour, shape
colour and shape class it shows; `score` compares that with the scene a prompt asked for.
Nothing here looks at latents or at how the image was made, so tests and benchmarks can
judge any backend's output.

How it reads a scene: every pixel is named after the nearest palette colour; the
background is the commonest name on the border ring, the shape colour the commonest other
name among pixels close to a palette colour. The shape is the largest connected region of
pixels closer to the shape's measured colour than to the background's; its bounding box is
rescaled to a square grid and compared with each shape's template, the nearest wins.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

from kiln_training.dataset import COLOURS, SHAPES, Scene, shape_mask

TEMPLATE_SIZE = 24
# A pixel within this RGB distance of a palette colour counts as a clean sample of it.
CLEAN_DISTANCE = 70.0
# Fewer shape pixels than this fraction of the image means "no shape".
MIN_SHAPE_FRACTION = 0.01

_NAMES = list(COLOURS)
_PALETTE = np.asarray([COLOURS[name] for name in _NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Judgement:
    """What an image shows: background and shape colour names, and the shape class.

    `colour` and `shape` are None when no shape stands out from the background.
    """

    background: str
    colour: str | None
    shape: str | None


@dataclass(frozen=True)
class Score:
    """How an image matches a scene: each attribute right or wrong."""

    background_right: bool
    colour_right: bool
    shape_right: bool

    @property
    def colours_right(self) -> bool:
        """Both the shape colour and the background colour are right."""
        return self.background_right and self.colour_right


def _as_rgb_array(image: object) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] < 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {array.shape}")
    return array[..., :3].astype(np.float32)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (empty mask in, empty out)."""
    height, width = mask.shape
    labels = np.zeros(mask.shape, dtype=np.int32)
    best_label, best_size, label = 0, 0, 0
    for start in zip(*np.nonzero(mask), strict=True):
        if labels[start]:
            continue
        label += 1
        labels[start] = label
        queue = deque([start])
        size = 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        if size > best_size:
            best_label, best_size = label, size
    return np.asarray(labels == best_label) if best_size else np.zeros_like(mask)


@cache
def _templates() -> dict[str, np.ndarray]:
    """Coverage of each shape filling a TEMPLATE_SIZE square exactly."""
    fine = TEMPLATE_SIZE * 4
    result = {}
    for shape in SHAPES:
        mask = shape_mask(shape, fine, 0.5, 0.5, 1.0)
        result[shape] = mask.reshape(TEMPLATE_SIZE, 4, TEMPLATE_SIZE, 4).mean(axis=(1, 3))
    return result


def _normalised_crop(mask: np.ndarray) -> np.ndarray:
    """The mask's bounding box resampled to TEMPLATE_SIZE² coverage values."""
    rows = np.nonzero(mask.any(axis=1))[0]
    cols = np.nonzero(mask.any(axis=0))[0]
    crop = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float32)
    fine = TEMPLATE_SIZE * 4
    ys = ((np.arange(fine) + 0.5) * crop.shape[0] / fine).astype(int)
    xs = ((np.arange(fine) + 0.5) * crop.shape[1] / fine).astype(int)
    sampled = crop[ys][:, xs]
    return np.asarray(sampled.reshape(TEMPLATE_SIZE, 4, TEMPLATE_SIZE, 4).mean(axis=(1, 3)))


def classify_shape(mask: np.ndarray) -> str | None:
    """The shape class whose template is nearest to the mask's box, None for an empty mask."""
    if not mask.any():
        return None
    crop = _normalised_crop(mask)
    distances = {shape: float(np.abs(crop - t).mean()) for shape, t in _templates().items()}
    return min(distances, key=lambda shape: distances[shape])


def read_scene(image: object) -> tuple[Judgement, np.ndarray]:
    """What `judge` reads, and the shape's pixels: a boolean mask [H, W] of the largest
    region closer to the shape's colour than to the background's (all False when no shape
    stands out). Inpainting benchmarks keep these pixels as the "product"."""
    pixels = _as_rgb_array(image)
    height, width, _ = pixels.shape
    distances = np.linalg.norm(pixels[:, :, None, :] - _PALETTE[None, None], axis=-1)
    nearest = distances.argmin(axis=-1)
    clean = distances.min(axis=-1) <= CLEAN_DISTANCE

    ring = np.ones((height, width), dtype=bool)
    ring[2:-2, 2:-2] = False
    background_index = int(np.bincount(nearest[ring], minlength=len(_NAMES)).argmax())
    background = _NAMES[background_index]
    nothing = np.zeros((height, width), dtype=bool)

    counts = np.bincount(nearest[clean], minlength=len(_NAMES))
    counts[background_index] = 0
    if counts.max() < MIN_SHAPE_FRACTION * height * width:
        counts = np.bincount(nearest.ravel(), minlength=len(_NAMES))
        counts[background_index] = 0
        if counts.max() < MIN_SHAPE_FRACTION * height * width:
            return Judgement(background=background, colour=None, shape=None), nothing
    colour_index = int(counts.argmax())

    fg_pixels = pixels[(nearest == colour_index) & clean]
    if len(fg_pixels) == 0:
        fg_pixels = pixels[nearest == colour_index]
    bg_pixels = pixels[nearest == background_index]
    fg_ref = np.median(fg_pixels, axis=0)
    bg_ref = np.median(bg_pixels, axis=0)
    closer_to_fg = np.linalg.norm(pixels - fg_ref, axis=-1) < np.linalg.norm(
        pixels - bg_ref, axis=-1
    )
    region = _largest_component(closer_to_fg)
    seen = Judgement(
        background=background, colour=_NAMES[colour_index], shape=classify_shape(region)
    )
    return seen, region


def judge(image: object) -> Judgement:
    """Read background colour, shape colour and shape class from an RGB image's pixels.

    Accepts anything numpy can turn into an (H, W, 3) array in 0..255 (a PIL image, a uint8
    array). Raises ValueError for other shapes of input.
    """
    return read_scene(image)[0]


def score(image: object, scene: Scene) -> Score:
    """Judge `image` and compare with the colours and shape `scene` asked for."""
    seen = judge(image)
    return Score(
        background_right=seen.background == scene.background,
        colour_right=seen.colour == scene.colour,
        shape_right=seen.shape == scene.shape,
    )


@dataclass(frozen=True)
class Adherence:
    """Fractions of images with both colours right, the shape right, and everything right."""

    images: int
    colours: float
    shape: float
    all_right: float

    def row(self) -> str:
        """Percentages as a Markdown table row fragment: colours | shape | all."""
        return f"{self.colours:.0%} | {self.shape:.0%} | {self.all_right:.0%}"


def adherence(scores: Iterable[Score]) -> Adherence:
    """Aggregate per-image scores into fractions (zero images gives zeros)."""
    items: Sequence[Score] = list(scores)
    n = len(items)
    if n == 0:
        return Adherence(images=0, colours=0.0, shape=0.0, all_right=0.0)
    return Adherence(
        images=n,
        colours=sum(s.colours_right for s in items) / n,
        shape=sum(s.shape_right for s in items) / n,
        all_right=sum(s.colours_right and s.shape_right for s in items) / n,
    )


# --------------------------------------------------------------------------- styles

# The "closeup" style (dataset.STYLES): the shape's box spans at least this fraction of the
# image side. Plain scenes span at most dataset.MAX_SHAPE_FRACTION (0.72), closeups
# dataset.CLOSEUP_MIN (0.86) or more; the threshold sits between.
CLOSEUP_THRESHOLD = 0.8


def shape_span(image: object) -> float:
    """The larger side of the shape's bounding box (`read_scene`'s shape region) as a
    fraction of the image side; 0 when no shape stands out."""
    pixels = _as_rgb_array(image)
    _, region = read_scene(pixels)
    if not region.any():
        return 0.0
    rows = np.nonzero(region.any(axis=1))[0]
    cols = np.nonzero(region.any(axis=0))[0]
    height = (rows[-1] - rows[0] + 1) / region.shape[0]
    width = (cols[-1] - cols[0] + 1) / region.shape[1]
    return float(max(height, width))


def style_present(image: object, style: str = "closeup") -> bool:
    """Whether an RGB image shows `style` (one of dataset.STYLES), from its pixels alone.
    Raises ValueError for an unknown style."""
    if style == "closeup":
        return shape_span(image) >= CLOSEUP_THRESHOLD
    raise ValueError(f"unknown style {style!r}")
