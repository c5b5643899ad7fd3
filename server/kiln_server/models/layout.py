"""Writing model folders in the diffusers SDXL layout.

`staged_folder` makes a write atomic: the new folder is filled beside the old one and
replaces it only when complete, so a crash never leaves half a model behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(folder: Path, carry: Sequence[str] = ()) -> Iterator[Path]:
    """Yield an empty sibling folder to write into; on success it replaces `folder`.

    Entries of the old folder named in `carry` (e.g. a training state) move into the new
    one first. If the block raises, `folder` is left as it was and the staging is removed.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        yield staging
        for name in carry:
            if (folder / name).exists():
                shutil.move(str(folder / name), str(staging / name))
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def write_model_index(folder: Path) -> None:
    """Write the model_index.json that marks `folder` as a StableDiffusionXLPipeline."""
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.31.0",
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def write_flux_model_index(folder: Path) -> None:
    """Write the model_index.json that marks `folder` as a FluxPipeline, as FLUX.1's own."""
    index = {
        "_class_name": "FluxPipeline",
        "_diffusers_version": "0.30.0.dev0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
