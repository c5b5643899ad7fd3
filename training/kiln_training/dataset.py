"""Synthetic scenes with a known ground truth: one coloured shape on a coloured background.

A scene is drawn from code, never stored: `sample_scene` picks a shape, two different
colours, a size and a position from a seeded generator, `render_scene` rasterises it with
anti-aliased edges, and `caption` writes the prompt that describes it, e.g.
"a red circle on a blue background". Every word of the vocabulary is a single token of the
real CLIP BPE tokenizer.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np

IMAGE_SIZE = 64

# Palette: well separated in RGB so the evaluator can tell them apart from pixels alone.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (250, 225, 30),
    "purple": (140, 40, 180),
    "orange": (255, 140, 0),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

# Side of the shape's bounding box, as a fraction of the image side.
MIN_SHAPE_FRACTION = 0.40
MAX_SHAPE_FRACTION = 0.72
# Pixels kept free between the shape and the image border.
MARGIN_FRACTION = 0.03
SUPERSAMPLING = 4

# Styles the generator can add to a scene (None: the plain scenes the base model learns).
# "closeup": the shape fills the frame, its box CLOSEUP_MIN..CLOSEUP_MAX of the image side
# (plain scenes: MIN_SHAPE_FRACTION..MAX_SHAPE_FRACTION), centred to within
# CLOSEUP_JITTER. Kiln-shapes' VAE decodes every latent to one palette colour or another
# (shades, thin outlines, stripes and dots come back as flat colour or smears), so a style
# it can show has to be geometry of the same two colours; a closeup keeps the colours and
# the shape class the pixel judge reads.
STYLES: tuple[str, ...] = ("closeup",)
CLOSEUP_MIN = 0.86
CLOSEUP_MAX = 0.92
CLOSEUP_JITTER = 0.01


@dataclass(frozen=True)
class Scene:
    """One scene: shape class, colour names, and the shape's box in image fractions.

    `center_x`, `center_y` and `extent` (side of the bounding box) are fractions of the
    image side, so one scene renders at any resolution.
    """

    shape: str
    colour: str
    background: str
    center_x: float = 0.5
    center_y: float = 0.5
    extent: float = 0.5


def caption(scene: Scene) -> str:
    """The prompt describing `scene`: "a <colour> <shape> on a <background> background"."""
    return f"a {scene.colour} {scene.shape} on a {scene.background} background"


def vocabulary_words() -> list[str]:
    """Every word a caption can contain (for tokenizer checks)."""
    return ["a", "on", "background", *COLOURS, *SHAPES]


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw one scene uniformly: shape, two distinct colours, size and position."""
    names = list(COLOURS)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour_index = int(rng.integers(len(names)))
    background_index = int(rng.integers(len(names) - 1))
    if background_index >= colour_index:
        background_index += 1
    extent = float(rng.uniform(MIN_SHAPE_FRACTION, MAX_SHAPE_FRACTION))
    low = MARGIN_FRACTION + extent / 2
    high = 1.0 - low
    return Scene(
        shape=shape,
        colour=names[colour_index],
        background=names[background_index],
        center_x=float(rng.uniform(low, high)),
        center_y=float(rng.uniform(low, high)),
        extent=extent,
    )


def shape_mask(
    shape: str, size: int, center_x: float, center_y: float, extent: float
) -> np.ndarray:
    """Boolean mask (size x size) of `shape` centred at the given fractions, no anti-aliasing.

    Pixel centres are sampled, so masks at a multiple of a size average to anti-aliased
    coverage. Raises ValueError for an unknown shape.
    """
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size
    x = coords[None, :] - center_x
    y = coords[:, None] - center_y
    half = extent / 2
    if shape == "circle":
        return np.asarray(x * x + y * y <= half * half)
    if shape == "square":
        return np.asarray((np.abs(x) <= half) & (np.abs(y) <= half))
    if shape == "triangle":
        # Apex at the top centre, base along the bottom of the box.
        depth = (y + half) / extent  # 0 at the apex, 1 at the base
        return np.asarray((depth >= 0) & (depth <= 1) & (np.abs(x) <= half * depth))
    if shape == "cross":
        arm = extent / 6
        inside = (np.abs(x) <= half) & (np.abs(y) <= half)
        return np.asarray(inside & ((np.abs(x) <= arm) | (np.abs(y) <= arm)))
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def styled(scene: Scene, style: str | None, rng: np.random.Generator) -> Scene:
    """`scene` with `style` applied to its geometry (None: unchanged).

    "closeup" redraws the size and position from `rng`: a shape filling the frame. Raises
    ValueError for an unknown style.
    """
    if style is None:
        return scene
    if style == "closeup":
        extent = float(rng.uniform(CLOSEUP_MIN, CLOSEUP_MAX))
        room = min(CLOSEUP_JITTER, 0.5 - MARGIN_FRACTION - extent / 2)
        return replace(
            scene,
            center_x=0.5 + float(rng.uniform(-room, room)),
            center_y=0.5 + float(rng.uniform(-room, room)),
            extent=extent,
        )
    raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")


def render_scene(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Render `scene` as a uint8 RGB array (size, size, 3) with anti-aliased edges."""
    fine = size * SUPERSAMPLING
    mask = shape_mask(scene.shape, fine, scene.center_x, scene.center_y, scene.extent)
    coverage = mask.reshape(size, SUPERSAMPLING, size, SUPERSAMPLING).mean(axis=(1, 3))
    fg = np.asarray(COLOURS[scene.colour], dtype=np.float64)
    bg = np.asarray(COLOURS[scene.background], dtype=np.float64)
    image = bg + coverage[..., None] * (fg - bg)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_batch(scenes: list[Scene], size: int = IMAGE_SIZE) -> np.ndarray:
    """Render scenes into a float32 array (N, 3, size, size) scaled to [-1, 1]."""
    images = np.stack([render_scene(scene, size) for scene in scenes]).astype(np.float32)
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2) / 127.5 - 1.0)


def sample_scenes(count: int, seed: int, style: str | None = None) -> list[Scene]:
    """`count` scenes from a generator seeded with `seed` (same seed, same scenes).

    With `style` (one of STYLES) every scene is drawn with that style (`styled`); the
    captions are the plain scenes' captions of the same seed.
    """
    rng = np.random.default_rng(seed)
    # The style's draws come from their own generator: same seed, same captions as plain.
    style_rng = np.random.default_rng([seed, 1])
    return [styled(sample_scene(rng), style, style_rng) for _ in range(count)]


def prompt_set(count: int, seed: int = 0) -> list[Scene]:
    """A fixed, balanced set of `count` centred scenes for adherence measurements.

    Cycles through shapes so each appears equally often, and walks the ordered colour
    pairs in a seeded shuffle so the colours are spread evenly. The scene geometry is the
    canonical centred one; generation only uses the caption.
    """
    pairs = [(c, b) for c, b in itertools.permutations(COLOURS, 2)]
    order = np.random.default_rng(seed).permutation(len(pairs))
    scenes = []
    for i in range(count):
        colour, background = pairs[int(order[i % len(pairs)])]
        scenes.append(Scene(shape=SHAPES[i % len(SHAPES)], colour=colour, background=background))
    return scenes
