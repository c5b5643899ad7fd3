"""Load a FLUX-family model from a folder in diffusers' FluxPipeline layout.

The same code loads Kiln's tiny FLUX models and a real FLUX.1-schnell or FLUX.1-dev
folder: `model_index.json` plus `transformer/` (FluxTransformer2DModel, possibly sharded),
`vae/` (16-channel AutoencoderKL with `scaling_factor` and `shift_factor`), `text_encoder/`
(CLIPTextModel: the pooled embedding), `text_encoder_2/` (T5EncoderModel), `tokenizer/`
(CLIP), `tokenizer_2/` (T5, tokenizer.json) and `scheduler/`. An optional `kiln.json`
carries Kiln's serving defaults, among them `max_sequence_length` (the T5 length the model
is served at; without it 512 for a dev-style model, 256 for a schnell-style one, as
Replicate's cog-flux serves them, capped by the T5 tokenizer's own maximum).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiln_server.engines.flux_components import PACK, FluxDims
from kiln_server.models.loader import ModelFolderError, quiet_library_progress, read_json

FLUX_REQUIRED_SUBFOLDERS = (
    "transformer",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "scheduler",
)
FLUX_PIPELINE_CLASSES = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")
# diffusers' FluxPipeline refuses longer T5 sequences.
MAX_T5_TOKENS = 512
DEV_T5_TOKENS = 512
SCHNELL_T5_TOKENS = 256


@dataclass
class FluxModules:
    """The torch modules of one FLUX model, in eval mode on the CPU."""

    transformer: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any


@dataclass
class FluxModelFiles:
    """Everything read from a FLUX folder (no weights) that the pipeline and engines need.

    Latents enter the transformer as `(z - vae_shift_factor) * vae_scaling_factor` and the
    VAE decoder as `z / vae_scaling_factor + vae_shift_factor`.
    """

    path: Path
    tokenizer: Any
    tokenizer_2: Any
    scheduler_config: dict[str, Any]
    dims: FluxDims
    vae_scaling_factor: float
    vae_shift_factor: float
    kiln_config: dict[str, Any] = field(default_factory=dict)
    # The VAE overflows in fp16 and must decode in fp32 (FLUX.1's VAE says so).
    vae_force_upcast: bool = True

    @property
    def guidance_embeds(self) -> bool:
        """True for a dev-style model: its transformer embeds a distilled guidance scale."""
        return self.dims.guidance_embeds

    @property
    def max_sequence_length(self) -> int:
        """The T5 sequence length prompts are padded (and truncated) to."""
        return self.dims.t5_tokens


def check_flux_model_folder(path: Path) -> None:
    """Raise ModelFolderError naming the first missing piece of a FLUX folder."""
    if not path.is_dir():
        raise ModelFolderError(f"model folder {path} does not exist or is not a folder")
    if not (path / "model_index.json").is_file():
        raise ModelFolderError(f"{path} has no model_index.json: not a diffusers model folder")
    class_name = read_json(path / "model_index.json").get("_class_name")
    if class_name is not None and class_name not in FLUX_PIPELINE_CLASSES:
        raise ModelFolderError(
            f"{path / 'model_index.json'} names pipeline class {class_name!r}, not a FLUX "
            f"pipeline ({', '.join(FLUX_PIPELINE_CLASSES)})"
        )
    missing = [name for name in FLUX_REQUIRED_SUBFOLDERS if not (path / name).is_dir()]
    if missing:
        raise ModelFolderError(
            f"{path} lacks {', '.join(missing)}: "
            f"a FLUX folder needs {', '.join(FLUX_REQUIRED_SUBFOLDERS)}"
        )


def _t5_tokens(path: Path, kiln_config: dict[str, Any], guidance: bool, tokenizer_max: int) -> int:
    """The served T5 length: kiln.json's `max_sequence_length`, else the family default
    capped by the tokenizer's maximum."""
    value = kiln_config.get("max_sequence_length")
    if value is None:
        default = DEV_T5_TOKENS if guidance else SCHNELL_T5_TOKENS
        return min(default, tokenizer_max)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_T5_TOKENS:
        raise ModelFolderError(
            f"{path / 'kiln.json'}: max_sequence_length must be an integer from 1 to "
            f"{MAX_T5_TOKENS}, got {value!r}"
        )
    return value


def _require_equal(path: Path, what: str, value: int, expected: int, source: str) -> None:
    if value != expected:
        raise ModelFolderError(f"{path}: {what} is {value} but {source} is {expected}")


def read_flux_model_files(path: Path) -> FluxModelFiles:
    """Read tokenizers and configs (no weights) and derive the model's dims.

    Checks that the parts fit together (the transformer takes 2x2 patches of the VAE's
    latents, the T5 width and the CLIP width), raising ModelFolderError naming the config
    and the mismatch.
    """
    from transformers import CLIPTokenizer, T5Tokenizer

    check_flux_model_folder(path)
    transformer_config = read_json(path / "transformer" / "config.json")
    vae_config = read_json(path / "vae" / "config.json")
    clip_config = read_json(path / "text_encoder" / "config.json")
    t5_config = read_json(path / "text_encoder_2" / "config.json")
    scheduler_config = read_json(path / "scheduler" / "scheduler_config.json")
    kiln_file = path / "kiln.json"
    kiln_config = read_json(kiln_file) if kiln_file.is_file() else {}
    transformer_file = path / "transformer" / "config.json"
    latent_channels = int(vae_config.get("latent_channels", 16))
    if int(transformer_config.get("patch_size", 1)) != 1:
        raise ModelFolderError(
            f"{transformer_file}: patch_size must be 1 (FLUX packs 2x2 latent patches "
            "outside the transformer)"
        )
    _require_equal(
        transformer_file,
        "in_channels",
        int(transformer_config.get("in_channels", 64)),
        latent_channels * PACK * PACK,
        f"4 x the VAE's latent_channels ({path / 'vae' / 'config.json'})",
    )
    _require_equal(
        transformer_file,
        "joint_attention_dim",
        int(transformer_config.get("joint_attention_dim", 4096)),
        int(t5_config["d_model"]),
        f"the T5 encoder's d_model ({path / 'text_encoder_2' / 'config.json'})",
    )
    _require_equal(
        transformer_file,
        "pooled_projection_dim",
        int(transformer_config.get("pooled_projection_dim", 768)),
        int(clip_config["hidden_size"]),
        f"the CLIP encoder's hidden_size ({path / 'text_encoder' / 'config.json'})",
    )
    if "scaling_factor" not in vae_config or "shift_factor" not in vae_config:
        raise ModelFolderError(
            f"{path / 'vae' / 'config.json'} needs scaling_factor and shift_factor "
            "(FLUX.1's are 0.3611 and 0.1159)"
        )
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    tokenizer_2 = T5Tokenizer.from_pretrained(path / "tokenizer_2")
    guidance = bool(transformer_config.get("guidance_embeds", False))
    dims = FluxDims(
        latent_channels=latent_channels,
        vae_scale_factor=2 ** (len(vae_config["block_out_channels"]) - 1),
        clip_hidden_size=int(clip_config["hidden_size"]),
        clip_tokens=int(tokenizer.model_max_length),
        t5_hidden_size=int(t5_config["d_model"]),
        t5_tokens=_t5_tokens(path, kiln_config, guidance, int(tokenizer_2.model_max_length)),
        guidance_embeds=guidance,
        image_channels=int(vae_config.get("out_channels", 3)),
        t5_vocab_size=int(t5_config["vocab_size"]),
    )
    return FluxModelFiles(
        path=path,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler_config=scheduler_config,
        dims=dims,
        vae_scaling_factor=float(vae_config["scaling_factor"]),
        vae_shift_factor=float(vae_config["shift_factor"]),
        kiln_config=kiln_config,
        vae_force_upcast=bool(vae_config.get("force_upcast", True)),
    )


def load_flux_modules(
    path: Path, dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype | None = None
) -> FluxModules:
    """Load the networks' weights from the folder onto the CPU, in eval mode.

    The transformer and text encoders load in `dtype`, the VAE in `vae_dtype` (default
    `dtype`), so a bf16 model is never materialized in fp32 on the way to the GPU.
    """
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    check_flux_model_folder(path)
    quiet_library_progress()
    modules = FluxModules(
        transformer=FluxTransformer2DModel.from_pretrained(path / "transformer", torch_dtype=dtype),
        vae=AutoencoderKL.from_pretrained(path / "vae", torch_dtype=vae_dtype or dtype),
        text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", dtype=dtype),
        text_encoder_2=T5EncoderModel.from_pretrained(path / "text_encoder_2", dtype=dtype),
    )
    for module in (modules.transformer, modules.vae, modules.text_encoder, modules.text_encoder_2):
        module.eval().requires_grad_(False)
    return modules
