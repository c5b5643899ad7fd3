"""Resolved generation parameters: what the pipeline runs after validation."""

from __future__ import annotations

from dataclasses import dataclass, field


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

    @property
    def seeds(self) -> list[int]:
        """The seed of every output image."""
        return [self.seed + i for i in range(self.num_outputs)]

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Guidance needs the unconditional branch only above 1.0 (as in diffusers)."""
        return self.guidance_scale > 1.0
