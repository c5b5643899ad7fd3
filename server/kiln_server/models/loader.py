"""Load an SDXL-family model from a folder in the diffusers layout.

The same code loads Kiln's embedded model and a real SDXL base checkpoint: `model_index.json`
plus `unet/`, `vae/`, `text_encoder/`, `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`,
`scheduler/`. An optional `kiln.json` carries Kiln's serving defaults for the model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiln_server.engines.components import ModelDims

# Kiln never reaches a model hub: every model is a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REQUIRED_SUBFOLDERS = (
    "unet",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "scheduler",
)


class ModelFolderError(ValueError):
    """The folder is not a loadable SDXL model; the message names what is wrong."""


@dataclass
class SDXLModules:
    """The torch modules of one model, in eval mode on the CPU."""

    unet: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any


@dataclass
class SDXLModelFiles:
    """Everything read from a model folder that the pipeline and engines need."""

    path: Path
    tokenizer: Any
    tokenizer_2: Any
    scheduler_config: dict[str, Any]
    dims: ModelDims
    vae_scaling_factor: float
    kiln_config: dict[str, Any] = field(default_factory=dict)
    force_zeros_for_empty_prompt: bool = True


def check_model_folder(path: Path) -> None:
    """Raise ModelFolderError naming the first missing piece of an SDXL folder."""
    if not path.is_dir():
        raise ModelFolderError(f"model folder {path} does not exist")
    if not (path / "model_index.json").is_file():
        raise ModelFolderError(f"{path} has no model_index.json: not a diffusers model folder")
    missing = [name for name in REQUIRED_SUBFOLDERS if not (path / name).is_dir()]
    if missing:
        raise ModelFolderError(
            f"{path} lacks {', '.join(missing)}: "
            f"an SDXL folder needs {', '.join(REQUIRED_SUBFOLDERS)}"
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path} must hold a JSON object")
    return data


def read_model_files(path: Path) -> SDXLModelFiles:
    """Read tokenizers and configs (no weights) and derive the model's dims."""
    from transformers import CLIPTokenizer

    check_model_folder(path)
    index = _read_json(path / "model_index.json")
    text_config = _read_json(path / "text_encoder" / "config.json")
    text_config_2 = _read_json(path / "text_encoder_2" / "config.json")
    unet_config = _read_json(path / "unet" / "config.json")
    vae_config = _read_json(path / "vae" / "config.json")
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(path / "tokenizer_2")
    addition_dim = int(unet_config.get("addition_time_embed_dim") or 0)
    projection_dim = int(unet_config.get("projection_class_embeddings_input_dim") or 0)
    if unet_config.get("addition_embed_type") != "text_time" or not addition_dim:
        raise ModelFolderError(
            f"{path / 'unet'} is not an SDXL UNet: it lacks the text_time added conditioning"
        )
    dims = ModelDims(
        latent_channels=int(unet_config["in_channels"]),
        vae_scale_factor=2 ** (len(vae_config["block_out_channels"]) - 1),
        text_hidden_size=int(text_config["hidden_size"]),
        text_hidden_size_2=int(text_config_2["hidden_size"]),
        pooled_dim=int(text_config_2.get("projection_dim") or text_config_2["hidden_size"]),
        max_tokens=int(tokenizer.model_max_length),
        num_time_ids=(projection_dim - int(text_config_2.get("projection_dim") or 0))
        // addition_dim,
    )
    kiln_file = path / "kiln.json"
    return SDXLModelFiles(
        path=path,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler_config=_read_json(scheduler_file),
        dims=dims,
        vae_scaling_factor=float(vae_config.get("scaling_factor", 0.13025)),
        kiln_config=_read_json(kiln_file) if kiln_file.is_file() else {},
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
    )


def load_modules(path: Path) -> SDXLModules:
    """Load the four networks' weights from the folder, in float32 eval mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    check_model_folder(path)
    quiet_library_progress()
    modules = SDXLModules(
        unet=UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=torch.float32),
        vae=AutoencoderKL.from_pretrained(path / "vae", torch_dtype=torch.float32),
        text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", dtype=torch.float32),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
            path / "text_encoder_2", dtype=torch.float32
        ),
    )
    for module in (modules.unet, modules.vae, modules.text_encoder, modules.text_encoder_2):
        module.eval().requires_grad_(False)
    return modules


def quiet_library_progress() -> None:
    """Silence diffusers' and transformers' own progress bars (Kiln logs its own steps)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def model_content_hash(path: Path) -> str:
    """SHA-256 over every weight and config file of the folder (relative paths included).

    Engine manifests record it, so engines built from other weights are refused.
    """
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel.startswith(".") or rel == "kiln.json":
            continue
        digest.update(rel.encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
