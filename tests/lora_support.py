"""LoRA files made the way real ones are, for the LoRA tests.

A diffusers/PEFT file comes from peft's `LoraConfig` on the tiny UNet (saved by diffusers'
`save_lora_weights` with its adapter metadata); a kohya / A1111 file
(`lora_unet_*.lora_down.weight`, `.lora_up.weight`, `.alpha`, with a conv layer) is written
from the same random weights. `write_kohya_lora` expects the model folder (or a link to it)
at `<source file's folder>/../model`.
"""

from __future__ import annotations

import builtins
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
CONV_MODULE = "down_blocks.0.resnets.0.conv1"
TIME_MODULE = "down_blocks.0.resnets.0.time_emb_proj"


@dataclass
class Made:
    """A LoRA file written by a test helper, with the weights it holds (diffusers names)."""

    path: Path
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    alpha: float


def tiny_unet(model: Path) -> Any:
    """The model folder's UNet, in eval mode."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(model / "unet").eval()


def make_peft_lora(model: Path, path: Path, *, rank: int, alpha: int, seed: int) -> Made:
    """A diffusers/PEFT LoRA file on the attention projections, with random non-zero B."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = tiny_unet(model)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=ATTENTION, init_lora_weights=True)
    unet.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    peft_state = get_peft_model_state_dict(unet)
    modules = {
        key.removesuffix(".lora_A.weight"): (
            value.clone(),
            peft_state[key.replace("lora_A", "lora_B")].clone(),
        )
        for key, value in peft_state.items()
        if key.endswith(".lora_A.weight")
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(
        str(path.parent),
        unet_lora_layers=convert_state_dict_to_diffusers(peft_state),
        unet_lora_adapter_metadata=config.to_dict(),
        weight_name=path.name,
        safe_serialization=True,
    )
    return Made(path, modules, alpha)


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
