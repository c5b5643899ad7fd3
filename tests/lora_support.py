"""LoRA files made the way real ones are, for the LoRA tests.

A diffusers/PEFT file comes from peft's `LoraConfig` on the tiny UNet (saved by diffusers'
`save_lora_weights` with its adapter metadata); a kohya / A1111 file
(`lora_unet_*.lora_down.weight`, `.lora_up.weight`, `.alpha`, with a conv layer) is written
from the same random weights. `write_kohya_lora` expects the model folder (or a link to it)
at `<source file's folder>/../model`. `make_peft_text_encoder_lora` adds adapters on both
text encoders' attention projections (CLIP-L `text_encoder`, CLIP-bigG `text_encoder_2`),
saved with diffusers' `save_lora_weights`; `write_kohya_text_encoder_lora` writes the same
weights in kohya's layout (`lora_unet_*`, `lora_te1_*`, `lora_te2_*`).
"""

from __future__ import annotations

import builtins
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
CLIP_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
KOHYA_TEXT_ENCODER_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
CONV_MODULE = "down_blocks.0.resnets.0.conv1"
TIME_MODULE = "down_blocks.0.resnets.0.time_emb_proj"


Pairs = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Made:
    """A LoRA file written by a test helper, with the weights it holds (diffusers names):
    the UNet's `modules` and each text encoder's (`text_encoders`, possibly none)."""

    path: Path
    modules: Pairs
    alpha: float
    text_encoders: dict[str, Pairs] = field(default_factory=dict)


def tiny_unet(model: Path) -> Any:
    """The model folder's UNet, in eval mode."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(model / "unet").eval()


def _random_adapter(
    model: Any, targets: list[str], *, rank: int, alpha: int, generator: torch.Generator
) -> tuple[dict[str, torch.Tensor], dict[str, Any], Pairs]:
    """Add a PEFT LoRA on `targets` of `model` with random non-zero A and B; returns its
    PEFT state dict, its config as a dict and its (down, up) pairs by module name."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True)
    model.add_adapter(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    peft_state = get_peft_model_state_dict(model)
    modules = {
        key.removesuffix(".lora_A.weight"): (
            value.clone(),
            peft_state[key.replace("lora_A", "lora_B")].clone(),
        )
        for key, value in peft_state.items()
        if key.endswith(".lora_A.weight")
    }
    return peft_state, config.to_dict(), modules


def make_peft_lora(
    model: Path,
    path: Path,
    *,
    rank: int,
    alpha: int,
    seed: int,
    text_encoders: bool = False,
) -> Made:
    """A diffusers/PEFT LoRA file on the UNet's attention projections, with random non-zero
    B; with `text_encoders`, also on both text encoders' attention projections."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    generator = torch.Generator().manual_seed(seed)
    peft_state, config, modules = _random_adapter(
        tiny_unet(model), ATTENTION, rank=rank, alpha=alpha, generator=generator
    )
    layers: dict[str, Any] = {
        "unet_lora_layers": convert_state_dict_to_diffusers(peft_state),
        "unet_lora_adapter_metadata": config,
    }
    encoders: dict[str, Pairs] = {}
    if text_encoders:
        classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
        for encoder in TEXT_ENCODERS:
            loaded = classes[encoder].from_pretrained(model / encoder).eval()
            state, encoder_config, pairs = _random_adapter(
                loaded, CLIP_ATTENTION, rank=rank, alpha=alpha, generator=generator
            )
            # Recorded as Kiln names them: without the `text_model.` level that some
            # transformers CLIP classes have.
            encoders[encoder] = {k.removeprefix("text_model."): v for k, v in pairs.items()}
            layers[f"{encoder}_lora_layers"] = convert_state_dict_to_diffusers(state)
            layers[f"{encoder}_lora_adapter_metadata"] = encoder_config
    path.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(
        str(path.parent), weight_name=path.name, safe_serialization=True, **layers
    )
    return Made(path, modules, alpha, encoders)


def write_kohya_text_encoder_lora(source: Made, path: Path, *, alpha: float) -> Made:
    """A kohya-format file of `source`'s UNet and text-encoder weights (no extra modules),
    the text encoders' modules named under `text_model`, as kohya's trainer names them."""
    tensors: dict[str, torch.Tensor] = {}
    parts = [("lora_unet_", source.modules)]
    parts += [
        (KOHYA_TEXT_ENCODER_PREFIXES[e] + "text_model_", m) for e, m in source.text_encoders.items()
    ]
    for prefix, modules in parts:
        for module, (down, up) in modules.items():
            key = prefix + module.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = down.contiguous()
            tensors[f"{key}.lora_up.weight"] = up.contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return Made(path, dict(source.modules), alpha, dict(source.text_encoders))


def write_kohya_lora(source: Made, path: Path, *, alpha: float, seed: int) -> Made:
    """A kohya-format file of `source`'s weights plus a 3x3 conv and a time-embedding linear."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(source.modules)
    rank = next(iter(modules.values()))[0].shape[0]
    unet = tiny_unet(source.path.parents[1] / "model")
    conv = unet.get_submodule(CONV_MODULE)
    modules[CONV_MODULE] = (
        torch.randn(rank, conv.in_channels, 3, 3, generator=generator) * 0.2,
        torch.randn(conv.out_channels, rank, 1, 1, generator=generator) * 0.2,
    )
    linear = unet.get_submodule(TIME_MODULE)
    modules[TIME_MODULE] = (
        torch.randn(rank, linear.in_features, generator=generator) * 0.2,
        torch.randn(linear.out_features, rank, generator=generator) * 0.2,
    )
    tensors: dict[str, torch.Tensor] = {}
    for module, (down, up) in modules.items():
        key = "lora_unet_" + module.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = down.contiguous()
        tensors[f"{key}.lora_up.weight"] = up.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return Made(path, modules, alpha)


def with_text_model_level(source: Made, path: Path) -> Made:
    """`source`'s file with all its text-encoder keys under `text_model.`, as diffusers
    wrote them with transformers' older CLIP layout (metadata kept)."""
    with safe_open(str(source.path), framework="pt") as handle:
        metadata = handle.metadata()
        keys = list(handle.keys())
        tensors = {}
        for key in keys:
            encoder, _, rest = key.partition(".")
            renamed = key
            if encoder in TEXT_ENCODERS and not rest.startswith("text_model."):
                renamed = f"{encoder}.text_model.{rest}"
            tensors[renamed] = handle.get_tensor(key)
    save_file(tensors, str(path), metadata=metadata)
    return Made(path, dict(source.modules), source.alpha, dict(source.text_encoders))


def record_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files opened from now on, through `open`, `io.open` or `Path.open` (a test of
    "no file outside the folders is ever opened" asserts the list stays empty)."""
    opened: list[str] = []
    real_open = builtins.open

    def spy(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def path_spy(self: Path, *args: Any, **kwargs: Any) -> Any:
        return spy(self, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    monkeypatch.setattr(Path, "open", path_spy)
    return opened
