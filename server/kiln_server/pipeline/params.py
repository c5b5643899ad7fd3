"""Resolved generation parameters: what the pipeline runs after validation."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TEXT_TO_IMAGE = "text_to_image"
IMAGE_TO_IMAGE = "image_to_image"
INPAINT = "inpaint"


@dataclass(frozen=True)
class PreviewParams:
    """Previews every `every_n_steps` steps (0 = none), longest side `max_size` pixels,
    drawn by `method` ("latent_rgb" or "decoder"; None: the model's best, its learned
    decoder when it has one). Validation always resolves the method."""

    every_n_steps: int = 0
    max_size: int = 256
    format: str = "jpeg"
    quality: int = 75
    method: str | None = None


@dataclass(frozen=True, eq=False)
class ImageConditioning:
    """The photo a request starts from, already at the request's width x height.

    `image` is uint8 RGB [height, width, 3]. `mask` (inpainting) is float32 [height, width]
    in [0, 1], 1 = repaint; the denoising loop binarizes it at 0.5 as diffusers'
    inpainting pipelines do. `strength` sets where in the schedule denoising starts.
    """

    image: np.ndarray
    strength: float
    mask: np.ndarray | None = None

    @property
    def mode(self) -> str:
        """IMAGE_TO_IMAGE, or INPAINT with a mask."""
        return INPAINT if self.mask is not None else IMAGE_TO_IMAGE


@dataclass(frozen=True, eq=False)
class Overlay:
    """How final images go back over the full photo, in the API process after decoding.

    `photo` is the uint8 RGB photo as sent [H, W, 3]; `mask` its uint8 mask [H, W] (0 keeps,
    255 repaints, grey blends). `box` (x1, y1, x2, y2), when the request cropped to its
    mask, is where the generated images go back into the photo. `keep_unmasked` pastes the
    photo's unmasked pixels over the result exactly.
    """

    photo: np.ndarray
    mask: np.ndarray
    box: tuple[int, int, int, int] | None = None
    keep_unmasked: bool = True


@dataclass(frozen=True)
class LoraUse:
    """One LoRA a request applies: its name in the model's LoRA folders and its scale (0: off)."""

    name: str
    scale: float = 1.0


@dataclass(frozen=True)
class GenerationParams:
    """One request with every default filled in. Image i uses seed + i.

    `negative_prompt` None means "no negative prompt", which SDXL encodes as zeros; an
    empty string would be encoded as the empty prompt.
    """

    prompt: str
    negative_prompt: str | None = None
    width: int = 64
    height: int = 64
    num_outputs: int = 1
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    scheduler: str = "K_EULER"
    seed: int = 0
    model: str = ""
    output_format: str = "png"
    output_quality: int = 90
    preview: PreviewParams = field(default_factory=PreviewParams)
    priority: int = 2
    # Image conditioning (img2img, inpainting); None: text-to-image.
    image: ImageConditioning | None = None
    # Only in the API process: what to paste over the decoded images (the engine core
    # never receives it).
    overlay: Overlay | None = None
    # LoRAs applied to this request's rows of the shared UNet call (empty: the base model).
    loras: tuple[LoraUse, ...] = ()

    @property
    def mode(self) -> str:
        """TEXT_TO_IMAGE, IMAGE_TO_IMAGE or INPAINT."""
        return TEXT_TO_IMAGE if self.image is None else self.image.mode

    @property
    def seeds(self) -> list[int]:
        """The seed of every output image."""
        return [self.seed + i for i in range(self.num_outputs)]

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Guidance needs the unconditional branch only above 1.0 (as in diffusers)."""
        return self.guidance_scale > 1.0
