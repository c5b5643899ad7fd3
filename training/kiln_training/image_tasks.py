"""Inpainting and img2img cases built from a model's own images, and how they are scored.

The "photo" of every case is the model's own text-to-image result for a scene of the fixed
prompt set (only photos the pixel judge reads as their prompt are used: a product photo
shows its product). The "product" is the photo's shape: the judge's shape pixels
(`evaluate.read_scene`) grown by one pixel, so the anti-aliased rim stays with it.

- Inpainting: the mask repaints everything but the product (white = repaint, black = keep,
  binary), and the prompt asks for the same shape and colour on another background colour
  ("a red circle on a blue background" -> "a red circle on a yellow background"). Scored:
  the judged background colour is the one asked for; the background is clean (at least
  CLEAN_SHARE of the pixels RIM or more pixels away from the product show that colour: no
  stray shapes or blotches); the product still reads as the same shape and colour; the
  largest and mean level difference of the kept pixels from the photo, as served
  (keep_unmasked on: the photo's pixels pasted back, so 0 is required) and straight out of
  the VAE decoder (keep_unmasked off).
- img2img: the prompt asks for the same shape in another colour on another background
  (both colours differ from the photo's). Scored: how close the result stays to the photo
  (PSNR; mean colour error over the photo's background and shape pixels, as
  `preview_decoder.closeness` measures it), whether it still shows the photo's colours,
  and whether it shows the prompt's.

Requests go the way the server takes them: the photo and mask are encoded as PNG, decoded
and framed by `kiln_server.image_inputs` (decode_image, frame_inputs), run by a runner, and
the decoded images put back over the photo by `apply_overlay`.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from kiln_training.dataset import COLOURS, Scene, caption, prompt_set
from kiln_training.evaluate import judge, read_scene, score
from kiln_training.preview_decoder import closeness

if TYPE_CHECKING:
    from kiln_server.pipeline.params import GenerationParams, Overlay

# A runner turns requests into one uint8 RGB image each (before any overlay).
Runner = Callable[[Sequence["GenerationParams"]], list[np.ndarray]]

# Seeds of the requests that repaint a photo: the photo's seed plus this.
REQUEST_SEED_OFFSET = 500
# Another seed for a photo the judge does not read as its prompt.
RETRY_SEED_OFFSET = 100_000


@dataclass(frozen=True, eq=False)
class Photo:
    """A model's own image of `scene` (seed `seed`) and its product pixels (bool [H, W])."""

    scene: Scene
    seed: int
    image: np.ndarray
    product: np.ndarray


@dataclass(frozen=True, eq=False)
class Case:
    """One request on a photo: the scene the prompt asks for, its seed, and (inpainting) the
    mask, uint8 [H, W], 255 = repaint, 0 = keep."""

    photo: Photo
    scene: Scene
    seed: int
    mask: np.ndarray | None = None

    @property
    def prompt(self) -> str:
        """The request's prompt."""
        return caption(self.scene)


def grow(mask: np.ndarray, pixels: int = 1) -> np.ndarray:
    """A boolean mask grown by `pixels` in the four directions, once per pixel."""
    grown = mask.copy()
    for _ in range(pixels):
        step = grown.copy()
        step[1:] |= grown[:-1]
        step[:-1] |= grown[1:]
        step[:, 1:] |= grown[:, :-1]
        step[:, :-1] |= grown[:, 1:]
        grown = step
    return grown


def source_photos(
    generate: Callable[[list[str], list[int]], list[np.ndarray]],
    prompts: int,
    seeds: int,
    *,
    tries: int = 4,
) -> tuple[list[Photo], int]:
    """Up to `prompts` x `seeds` photos of the fixed prompt set, each one the judge reads as
    its prompt (a photo judged wrong is drawn again with another seed, up to `tries` times;
    a slot that fails every try is left out).

    `generate(prompts, seeds)` is a text-to-image sampler. Returns the photos and how many
    draws were replaced (redrawn or left out).
    """
    scenes = prompt_set(prompts)
    slots = [(scene, 1000 * (k + 1) + i) for k in range(seeds) for i, scene in enumerate(scenes)]
    photos: list[Photo | None] = [None] * len(slots)
    pending = list(range(len(slots)))
    replaced = 0
    for attempt in range(tries):
        if not pending:
            break
        seeds_now = [slots[j][1] + attempt * RETRY_SEED_OFFSET for j in pending]
        images = generate([caption(slots[j][0]) for j in pending], seeds_now)
        failed = []
        for j, seed, image in zip(pending, seeds_now, images, strict=True):
            seen, region = read_scene(image)
            scene = slots[j][0]
            right = (seen.background, seen.colour, seen.shape) == (
                scene.background,
                scene.colour,
                scene.shape,
            )
            if right:
                photos[j] = Photo(scene, seed, image, grow(region))
            else:
                failed.append(j)
        replaced += len(failed)
        pending = failed
    return [photo for photo in photos if photo is not None], replaced


def _other_colours(*used: str) -> list[str]:
    return [name for name in COLOURS if name not in used]


def inpainting_cases(photos: Sequence[Photo]) -> list[Case]:
    """Per photo: keep the product, ask for another background colour. The new colours
    cycle through the six that are neither the shape's nor the old background's."""
    cases = []
    for i, photo in enumerate(photos):
        choices = _other_colours(photo.scene.colour, photo.scene.background)
        scene = replace(photo.scene, background=choices[i % len(choices)])
        mask = np.where(photo.product, 0, 255).astype(np.uint8)
        cases.append(Case(photo, scene, photo.seed + REQUEST_SEED_OFFSET, mask))
    return cases


def img2img_cases(photos: Sequence[Photo]) -> list[Case]:
    """Per photo: the same shape in another colour on another background, both colours
    different from the photo's (pairs cycled so every colour is asked for)."""
    cases = []
    for i, photo in enumerate(photos):
        choices = _other_colours(photo.scene.colour, photo.scene.background)
        colour = choices[i % len(choices)]
        offset = 1 + (i // len(choices)) % (len(choices) - 1)
        background = choices[(i + offset) % len(choices)]
        scene = replace(photo.scene, colour=colour, background=background)
        cases.append(Case(photo, scene, photo.seed + REQUEST_SEED_OFFSET))
    return cases


def png_bytes(pixels: np.ndarray) -> bytes:
    """An RGB or greyscale uint8 array as PNG bytes, as a client uploads it."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True, eq=False)
class Served:
    """A case's request as the server frames it, and the overlay it applies after."""

    params: GenerationParams
    overlay: Overlay | None


def frame(
    case: Case,
    strength: float,
    defaults: dict[str, object],
    *,
    keep_unmasked: bool = True,
) -> Served:
    """The request the server runs for `case`: photo (and mask) through PNG bytes,
    `decode_image` and `frame_inputs` at the photo's size, the model's default steps,
    guidance and scheduler."""
    from kiln_server.image_inputs import ImageInputLimits, decode_image, frame_inputs
    from kiln_server.pipeline.params import GenerationParams

    limits = ImageInputLimits()
    photo = decode_image(png_bytes(case.photo.image), "image", limits)
    mask = None if case.mask is None else decode_image(png_bytes(case.mask), "mask", limits)
    height, width = case.photo.image.shape[:2]
    framed = frame_inputs(
        photo,
        mask,
        width=width,
        height=height,
        strength=strength,
        keep_unmasked=keep_unmasked,
        crop_padding=None,
    )
    params = GenerationParams(
        prompt=case.prompt,
        width=width,
        height=height,
        num_inference_steps=int(str(defaults.get("default_num_inference_steps", 20))),
        guidance_scale=float(str(defaults.get("default_guidance_scale", 5.0))),
        scheduler=str(defaults.get("default_scheduler", "K_EULER")),
        seed=case.seed,
        image=framed.conditioning,
    )
    return Served(params, framed.overlay)


def overlay(image: np.ndarray, served: Served) -> np.ndarray:
    """The image as the server returns it: put back over the photo when it has an overlay."""
    from kiln_server.image_inputs import apply_overlay

    if served.overlay is None:
        return image
    return apply_overlay(image, served.overlay)


# Repainted pixels at least this far (in pixels) from the product count for the clean
# background share; nearer ones are the product's rim, where the overlay's edge lies.
RIM = 3
# A repainted background counts as clean when at least this share of it shows the colour
# asked for (no stray shapes or blotches).
CLEAN_SHARE = 0.9


def background_share(image: np.ndarray, product: np.ndarray, colour: str) -> float:
    """Share of the pixels at least RIM pixels away from `product` whose nearest palette
    colour is `colour` (how much of the background shows that colour, 0-1)."""
    names = list(COLOURS)
    palette = np.asarray([COLOURS[name] for name in names], dtype=np.float32)
    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    nearest = np.linalg.norm(pixels[:, :, None] - palette[None, None], axis=-1).argmin(axis=-1)
    region = ~grow(product, RIM)
    return float((nearest[region] == names.index(colour)).mean())


@dataclass(frozen=True)
class InpaintScore:
    """One inpainting result, as served and straight from the decoder."""

    background_share: float
    background_right: bool
    background_right_raw: bool
    product_right: bool
    kept_max: int
    kept_max_raw: int
    kept_mean_raw: float


def _kept_difference(image: np.ndarray, case: Case) -> np.ndarray:
    assert case.mask is not None
    kept = case.mask == 0
    diff = np.abs(image.astype(np.int16) - case.photo.image.astype(np.int16))
    return np.asarray(diff[kept])


def score_inpainting(case: Case, served: np.ndarray, raw: np.ndarray) -> InpaintScore:
    """Score the served image (overlay applied) and the raw decoder output of a case."""
    seen = judge(served)
    photo = case.photo.scene
    kept_raw = _kept_difference(raw, case)
    return InpaintScore(
        background_share=background_share(served, case.photo.product, case.scene.background),
        background_right=seen.background == case.scene.background,
        background_right_raw=judge(raw).background == case.scene.background,
        product_right=(seen.colour, seen.shape) == (photo.colour, photo.shape),
        kept_max=int(_kept_difference(served, case).max()),
        kept_max_raw=int(kept_raw.max()),
        kept_mean_raw=float(kept_raw.mean()),
    )


@dataclass(frozen=True)
class InpaintResult:
    """Aggregate over cases: fractions right, and kept-pixel differences in levels."""

    cases: int
    background_right: float
    background_right_raw: float
    background_clean: float
    background_share: float
    product_right: float
    kept_max: int
    kept_exact: float
    kept_max_raw: int
    kept_mean_raw: float


def inpainting_result(scores: Sequence[InpaintScore]) -> InpaintResult:
    """Fractions over the cases; the largest kept-pixel differences over all of them."""
    n = len(scores)
    return InpaintResult(
        cases=n,
        background_right=sum(s.background_right for s in scores) / n,
        background_right_raw=sum(s.background_right_raw for s in scores) / n,
        background_clean=sum(s.background_share >= CLEAN_SHARE for s in scores) / n,
        background_share=float(np.mean([s.background_share for s in scores])),
        product_right=sum(s.product_right for s in scores) / n,
        kept_max=max(s.kept_max for s in scores),
        kept_exact=sum(s.kept_max == 0 for s in scores) / n,
        kept_max_raw=max(s.kept_max_raw for s in scores),
        kept_mean_raw=float(np.mean([s.kept_mean_raw for s in scores])),
    )


@dataclass(frozen=True)
class Img2ImgScore:
    """One img2img result: closeness to the photo, and whose colours it shows."""

    psnr: float
    background_error: float
    shape_error: float
    photo_colours: bool
    prompt_colours: bool
    prompt_all: bool


def score_img2img(case: Case, image: np.ndarray) -> Img2ImgScore:
    """Compare an img2img result with its photo and with its prompt's scene."""
    near = closeness(image, case.photo.image)
    seen = judge(image)
    wanted = score(image, case.scene)
    photo = case.photo.scene
    return Img2ImgScore(
        psnr=near.psnr,
        background_error=near.background,
        shape_error=near.shape,
        photo_colours=(seen.background, seen.colour) == (photo.background, photo.colour),
        prompt_colours=wanted.colours_right,
        prompt_all=wanted.colours_right and wanted.shape_right,
    )


@dataclass(frozen=True)
class Img2ImgResult:
    """Aggregate over cases: mean closeness to the photo and fractions of colours."""

    cases: int
    psnr: float
    background_error: float
    shape_error: float
    photo_colours: float
    prompt_colours: float
    prompt_all: float


def img2img_result(scores: Sequence[Img2ImgScore]) -> Img2ImgResult:
    """Means of the closeness measures (NaN shape errors skipped) and fractions."""
    n = len(scores)
    return Img2ImgResult(
        cases=n,
        psnr=float(np.mean([min(s.psnr, 99.0) for s in scores])),
        background_error=float(np.nanmean([s.background_error for s in scores])),
        shape_error=float(np.nanmean([s.shape_error for s in scores])),
        photo_colours=sum(s.photo_colours for s in scores) / n,
        prompt_colours=sum(s.prompt_colours for s in scores) / n,
        prompt_all=sum(s.prompt_all for s in scores) / n,
    )


def photo_backgrounds(photos: Sequence[Photo]) -> tuple[float, float]:
    """The clean-background measure on the photos themselves (text-to-image images): the
    share of photos whose background is clean, and the mean share. What inpainting's
    numbers compare with."""
    shares = [background_share(p.image, p.product, p.scene.background) for p in photos]
    return sum(share >= CLEAN_SHARE for share in shares) / len(shares), float(np.mean(shares))


def run_inpainting(
    runner: Runner,
    cases: Sequence[Case],
    strength: float,
    defaults: dict[str, object],
) -> list[InpaintScore]:
    """Run every case at `strength` through `runner` and score it, served and raw."""
    framed = [frame(case, strength, defaults) for case in cases]
    images = runner([served.params for served in framed])
    return [
        score_inpainting(case, overlay(image, served), image)
        for case, served, image in zip(cases, framed, images, strict=True)
    ]


def run_img2img(
    runner: Runner,
    cases: Sequence[Case],
    strength: float,
    defaults: dict[str, object],
) -> list[Img2ImgScore]:
    """Run every case at `strength` through `runner` and score it."""
    framed = [frame(case, strength, defaults) for case in cases]
    images = runner([served.params for served in framed])
    return [
        score_img2img(case, overlay(image, served))
        for case, served, image in zip(cases, framed, images, strict=True)
    ]
