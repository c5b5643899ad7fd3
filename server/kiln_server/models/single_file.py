"""Single-file SDXL checkpoints: checking one against its config folder, and loading it.

A single-file checkpoint is one `.safetensors` file in the original (Stability / A1111)
key layout holding the UNet, VAE and both text encoders. Its configs, tokenizers and
scheduler come from a local diffusers folder (the "config folder", e.g. the base model it
was fine-tuned from); diffusers' single-file loading converts the weights against that
folder's configs, never a hub.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from kiln_server.models.loader import ModelFolderError, check_model_folder
from kiln_server.models.original_layout import (
    COMPONENT_PREFIXES,
    LayoutError,
    to_original_layout,
)

# Buffers some exporters save beside the weights; no network needs them.
_IGNORED_EXTRAS = re.compile(r"\.(position_ids|logit_scale|attn_mask)$")
# How the weights of a diffusers folder's networks (or a pipeline's state dict) begin.
_DIFFUSERS_KEY = re.compile(
    r"(unet|vae|text_encoder(_2)?|text_model)\.|((encoder|decoder)\.)?(down|up)_blocks\."
    r"|mid_block\.|embeddings\.|encoder\.layers\."
)
LAYOUT_HINT = (
    "a single-file SDXL checkpoint in the original layout holds model.diffusion_model.*, "
    "first_stage_model.*, conditioner.embedders.0.transformer.* and "
    "conditioner.embedders.1.model.* tensors"
)


class CheckpointError(ModelFolderError):
    """The checkpoint cannot be served with its config folder; the message names the file
    and the fix."""


def read_shapes(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from `checkpoint`'s safetensors header (no tensor is read);
    CheckpointError when it is missing or not a safetensors file."""
    from kiln_server.lora.listing import HeaderError, read_header

    if not checkpoint.exists():
        raise CheckpointError(
            f"checkpoint {checkpoint} does not exist; fix `checkpoint` (relative paths are "
            "resolved against the config file's folder)"
        )
    if not checkpoint.is_file():
        raise CheckpointError(
            f"checkpoint {checkpoint} is not a file; `checkpoint` names one .safetensors file "
            "(a diffusers folder goes in `path`)"
        )
    try:
        header = read_header(checkpoint)
    except (HeaderError, OSError) as exc:
        raise CheckpointError(
            f"checkpoint {checkpoint} is not a safetensors file ({exc}); Kiln loads "
            "single-file checkpoints only as .safetensors: download or re-save the model in "
            "that format (pickled .ckpt files can run code and are refused)"
        ) from exc
    return {key: tuple(shape) for key, shape in header.items()}


def _describe_foreign(keys: list[str]) -> str:
    """What a file without original-layout keys looks like, and where it belongs instead."""
    lora = next((k for k in keys if "lora" in k.lower()), None)
    if lora is not None:
        return (
            f"it looks like a LoRA (key {lora}): put it in a folder named in the model's "
            "`lora_dirs` and select it per request with `loras`"
        )
    diffusers = next((k for k in keys if _DIFFUSERS_KEY.match(k)), None)
    if diffusers is not None:
        return (
            f"it looks like diffusers-layout weights (key {diffusers}): serve a complete "
            'diffusers folder with `path = "FOLDER"` instead'
        )
    return f"its tensors are named like {', '.join(keys[:3]) or 'nothing (it is empty)'}"


def expected_shapes(config_folder: Path) -> dict[str, tuple[int, ...]]:
    """The original-layout tensor shapes the configs in `config_folder` imply, from the
    networks built on the meta device (no memory, no weights read)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(config_folder / "unet")
            )
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_folder / "vae"))
            text_encoder = CLIPTextModel(
                CLIPTextConfig.from_pretrained(config_folder / "text_encoder")
            )
            text_encoder_2 = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(config_folder / "text_encoder_2")
            )
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(
            f"cannot read the network configs of config folder {config_folder}: {exc}; "
            "point `config_folder` at a diffusers SDXL folder with unet/, vae/, "
            "text_encoder/ and text_encoder_2/ config.json files"
        ) from exc
    try:
        state = to_original_layout(unet, vae, text_encoder, text_encoder_2)
    except LayoutError as exc:
        raise CheckpointError(
            f"config folder {config_folder} describes a network outside the SDXL layout "
            f"({exc}); point `config_folder` at an SDXL diffusers folder"
        ) from exc
    return {key: tuple(value.shape) for key, value in state.items()}


def _shape(shape: tuple[int, ...]) -> str:
    return f"[{', '.join(map(str, shape))}]"


def check_config_folder(config_folder: Path) -> None:
    """Raise CheckpointError unless `config_folder` is a diffusers SDXL folder (its
    weights may be absent: only configs, tokenizers and scheduler are read from it)."""
    try:
        check_model_folder(config_folder)
    except ModelFolderError as exc:
        raise CheckpointError(
            f"config_folder: {exc}; point `config_folder` at a local diffusers SDXL folder "
            "that gives the checkpoint's configs, tokenizers and scheduler (e.g. the base "
            "model it was fine-tuned from; its network weights are not needed)"
        ) from exc


def check_checkpoint(checkpoint: Path, config_folder: Path) -> None:
    """Raise CheckpointError unless `checkpoint` is an original-layout SDXL safetensors
    file whose every tensor the configs in `config_folder` (a diffusers SDXL folder,
    checked by check_config_folder) expect, with the same shape.

    Reads only the file's header and the folder's configs. Tensors outside the four
    networks (EMA copies, sampler constants) are ignored.
    """
    shapes = read_shapes(checkpoint)
    keys = sorted(shapes)
    present = {
        name
        for name, prefix in COMPONENT_PREFIXES.items()
        if any(k.startswith(prefix) for k in keys)
    }
    if not present:
        raise CheckpointError(
            f"checkpoint {checkpoint} is not in the original SDXL layout: "
            f"{_describe_foreign(keys)}; {LAYOUT_HINT}"
        )
    if any(k.startswith("cond_stage_model.") for k in keys):
        raise CheckpointError(
            f"checkpoint {checkpoint} is a Stable Diffusion 1.x/2.x checkpoint (its text "
            "encoder is cond_stage_model.*), not SDXL: Kiln serves SDXL-family models; "
            f"{LAYOUT_HINT}"
        )
    if len(present) < len(COMPONENT_PREFIXES):
        missing = [
            f"{name} ({COMPONENT_PREFIXES[name]}*)"
            for name in COMPONENT_PREFIXES
            if name not in present
        ]
        raise CheckpointError(
            f"checkpoint {checkpoint} lacks {', '.join(missing)}: Kiln serves complete "
            f"checkpoints; {LAYOUT_HINT}"
        )
    check_config_folder(config_folder)
    expected = expected_shapes(config_folder)
    where = f"config folder {config_folder}"
    fix = (
        "the checkpoint is another architecture than the config folder describes: point "
        "`config_folder` at the diffusers folder of the model it was made from"
    )
    absent = [k for k in expected if k not in shapes]
    if absent:
        raise CheckpointError(
            f"checkpoint {checkpoint} lacks {len(absent)} tensor(s) that {where} expects, "
            f"e.g. {absent[0]}; {fix}"
        )
    for key, shape in expected.items():
        if shapes[key] != shape:
            raise CheckpointError(
                f"checkpoint {checkpoint}: tensor {key} is {_shape(shapes[key])} but "
                f"{where} expects {_shape(shape)}; {fix}"
            )
    prefixes = tuple(COMPONENT_PREFIXES.values())
    extra = [
        k
        for k in keys
        if k.startswith(prefixes) and k not in expected and not _IGNORED_EXTRAS.search(k)
    ]
    if extra:
        raise CheckpointError(
            f"checkpoint {checkpoint} has {len(extra)} tensor(s) {where} has no place for, "
            f"e.g. {extra[0]}; {fix}"
        )


class _NoEmptyFp32Warning(logging.Filter):
    """Drops diffusers' warning that casting after a single-file load may skip modules
    kept in float32 when there are none (the SDXL networks keep none): it would mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


_EMPTY_FP32_WARNING = _NoEmptyFp32Warning()


def load_checkpoint_networks(
    checkpoint: Path, config_folder: Path, dtype: torch.dtype, vae_dtype: torch.dtype
) -> dict[str, Any]:
    """The UNet, VAE and text encoders of `checkpoint` (checked first) as diffusers /
    transformers modules on the CPU, keyed by component name: converted by diffusers'
    single-file loading against `config_folder`'s configs, local files only. The VAE
    loads in `vae_dtype`, the rest in `dtype`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    check_checkpoint(checkpoint, config_folder)
    logging.getLogger("diffusers.models.modeling_utils").addFilter(_EMPTY_FP32_WARNING)
    state = load_file(str(checkpoint))  # read once, shared by the four conversions
    config = str(config_folder)
    networks = {
        "unet": UNet2DConditionModel.from_single_file(
            state, config=config, subfolder="unet", torch_dtype=dtype, local_files_only=True
        ),
        "vae": AutoencoderKL.from_single_file(
            state, config=config, subfolder="vae", torch_dtype=vae_dtype, local_files_only=True
        ),
    }
    for name, cls in (
        ("text_encoder", CLIPTextModel),
        ("text_encoder_2", CLIPTextModelWithProjection),
    ):
        networks[name] = create_diffusers_clip_model_from_ldm(
            cls,
            state,
            subfolder=name,
            config=config,
            torch_dtype=dtype,
            local_files_only=True,
        )
    return networks
