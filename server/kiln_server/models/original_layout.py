"""SDXL weights in the original single-file layout (Stability's / A1111's `.safetensors`).

`to_original_layout` renames the state dicts of a diffusers SDXL model (UNet, VAE and both
text encoders) to the keys and tensor shapes of the original single-file checkpoint, the
inverse of diffusers' single-file conversion; `write_original_checkpoint` turns a diffusers
folder into such a file. Run as a module to convert a folder:

    python -m kiln_server.models.original_layout models/kiln-shapes shapes.safetensors
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "conditioner.embedders.0.transformer."
TEXT_ENCODER_2_PREFIX = "conditioner.embedders.1.model."
# Which network each prefix holds, for messages naming what a checkpoint lacks.
COMPONENT_PREFIXES = {
    "unet": UNET_PREFIX,
    "vae": VAE_PREFIX,
    "text_encoder": TEXT_ENCODER_PREFIX,
    "text_encoder_2": TEXT_ENCODER_2_PREFIX,
}

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_LAYERS = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


class LayoutError(ValueError):
    """A state dict has a key the original SDXL layout has no place for."""


def _rename(
    state: Mapping[str, torch.Tensor],
    rules: list[tuple[str, Callable[[re.Match[str]], str]]],
    component: str,
) -> dict[str, torch.Tensor]:
    """Each key renamed by the first rule whose pattern matches it whole."""
    out = {}
    for key, value in state.items():
        for pattern, rename in rules:
            match = re.fullmatch(pattern, key)
            if match:
                out[rename(match)] = value
                break
        else:
            raise LayoutError(f"{component} key {key!r} has no place in the original SDXL layout")
    return out


def _resnet(rest: str, names: Mapping[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{names.get(head, head)}.{tail}"


def unet_to_original(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict under the original `model.diffusion_model.`
    keys; `config` is the UNet's config (layers_per_block, up_block_types)."""
    per_block = int(config["layers_per_block"]) + 1
    with_attention = ["CrossAttn" in kind for kind in config["up_block_types"]]

    def down(m: re.Match[str]) -> str:
        index = 1 + int(m["block"]) * per_block + int(m["layer"])
        if m["kind"] == "resnets":
            return f"input_blocks.{index}.0.{_resnet(m['rest'], _RESNET)}"
        return f"input_blocks.{index}.1.{m['rest']}"

    def up(m: re.Match[str]) -> str:
        index = int(m["block"]) * per_block + int(m["layer"])
        if m["kind"] == "resnets":
            return f"output_blocks.{index}.0.{_resnet(m['rest'], _RESNET)}"
        return f"output_blocks.{index}.1.{m['rest']}"

    def upsample(m: re.Match[str]) -> str:
        block = int(m["block"])
        slot = 2 if with_attention[block] else 1
        return f"output_blocks.{block * per_block + per_block - 1}.{slot}.conv.{m['rest']}"

    layers = "|".join(re.escape(name) for name in _UNET_LAYERS)
    rules: list[tuple[str, Callable[[re.Match[str]], str]]] = [
        (rf"(?P<name>{layers})\.(?P<rest>\w+)", lambda m: f"{_UNET_LAYERS[m['name']]}.{m['rest']}"),
        (
            r"down_blocks\.(?P<block>\d+)\.(?P<kind>resnets|attentions)\.(?P<layer>\d+)\.(?P<rest>.+)",
            down,
        ),
        (
            r"down_blocks\.(?P<block>\d+)\.downsamplers\.0\.conv\.(?P<rest>\w+)",
            lambda m: f"input_blocks.{(int(m['block']) + 1) * per_block}.0.op.{m['rest']}",
        ),
        (
            r"mid_block\.resnets\.(?P<index>\d+)\.(?P<rest>.+)",
            lambda m: f"middle_block.{2 * int(m['index'])}.{_resnet(m['rest'], _RESNET)}",
        ),
        (r"mid_block\.attentions\.0\.(?P<rest>.+)", lambda m: f"middle_block.1.{m['rest']}"),
        (
            r"up_blocks\.(?P<block>\d+)\.(?P<kind>resnets|attentions)\.(?P<layer>\d+)\.(?P<rest>.+)",
            up,
        ),
        (r"up_blocks\.(?P<block>\d+)\.upsamplers\.0\.conv\.(?P<rest>\w+)", upsample),
    ]
    return {UNET_PREFIX + k: v for k, v in _rename(state, rules, "unet").items()}


def vae_to_original(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict under the original `first_stage_model.` keys,
    its attention projections as the original's 1x1 convolutions."""
    levels = len(config["up_block_types"])
    shortcut = {"conv_shortcut": "nin_shortcut"}

    def attention(m: re.Match[str]) -> str:
        return f"{m['part']}.mid.attn_1.{_VAE_ATTENTION[m['name']]}.{m['rest']}"

    names = "|".join(re.escape(name) for name in _VAE_ATTENTION)
    rules: list[tuple[str, Callable[[re.Match[str]], str]]] = [
        (
            r"encoder\.down_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.(?P<rest>.+)",
            lambda m: f"encoder.down.{m['i']}.block.{m['j']}.{_resnet(m['rest'], shortcut)}",
        ),
        (
            r"encoder\.down_blocks\.(?P<i>\d+)\.downsamplers\.0\.conv\.(?P<rest>\w+)",
            lambda m: f"encoder.down.{m['i']}.downsample.conv.{m['rest']}",
        ),
        (
            r"decoder\.up_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.(?P<rest>.+)",
            lambda m: (
                f"decoder.up.{levels - 1 - int(m['i'])}.block.{m['j']}."
                f"{_resnet(m['rest'], shortcut)}"
            ),
        ),
        (
            r"decoder\.up_blocks\.(?P<i>\d+)\.upsamplers\.0\.conv\.(?P<rest>\w+)",
            lambda m: f"decoder.up.{levels - 1 - int(m['i'])}.upsample.conv.{m['rest']}",
        ),
        (
            r"(?P<part>encoder|decoder)\.mid_block\.resnets\.(?P<r>\d+)\.(?P<rest>.+)",
            lambda m: f"{m['part']}.mid.block_{int(m['r']) + 1}.{_resnet(m['rest'], shortcut)}",
        ),
        (
            rf"(?P<part>encoder|decoder)\.mid_block\.attentions\.0\.(?P<name>{names})\.(?P<rest>\w+)",
            attention,
        ),
        (
            r"(?P<part>encoder|decoder)\.conv_norm_out\.(?P<rest>\w+)",
            lambda m: f"{m['part']}.norm_out.{m['rest']}",
        ),
        (
            r"(?:encoder\.|decoder\.)?(?:conv_in|conv_out|quant_conv|post_quant_conv)\.\w+",
            lambda m: m[0],
        ),
    ]
    out = {}
    for key, value in _rename(state, rules, "vae").items():
        is_projection = re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", key)
        out[VAE_PREFIX + key] = value[:, :, None, None] if is_projection else value
    return out


def text_encoder_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel state dict (with or without its `text_model.` level)
    under the original `conditioner.embedders.0.transformer.text_model.` keys."""
    return {
        TEXT_ENCODER_PREFIX + (k if k.startswith("text_model.") else f"text_model.{k}"): v
        for k, v in state.items()
    }


def text_encoder_2_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection state dict as the original OpenCLIP
    text tower (`conditioner.embedders.1.model.`): fused q/k/v projections, a transposed
    text projection."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    layers: set[str] = set()
    for key, value in state.items():
        match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if match and match[2].startswith("self_attn.") and match[2] != "self_attn.out_proj":
            layers.add(match[1])
            continue
        if match and match[2] in _OPEN_CLIP_LAYER:
            out[f"transformer.resblocks.{match[1]}.{_OPEN_CLIP_LAYER[match[2]]}.{match[3]}"] = value
        elif key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.removeprefix("final_layer_norm.")] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        else:
            raise LayoutError(
                f"text_encoder_2 key {key!r} has no place in the original SDXL layout"
            )
    for layer in sorted(layers, key=int):
        attention = f"encoder.layers.{layer}.self_attn"
        for kind in ("weight", "bias"):
            parts = [state[f"{attention}.{name}_proj.{kind}"] for name in ("q", "k", "v")]
            out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(parts)
    return {TEXT_ENCODER_2_PREFIX + k: v for k, v in out.items()}


def to_original_layout(
    unet: Any, vae: Any, text_encoder: Any, text_encoder_2: Any
) -> dict[str, torch.Tensor]:
    """The four networks' weights as one original-layout SDXL state dict (the modules may
    live on the meta device: the result's shapes are then the layout a config implies)."""
    return {
        **unet_to_original(unet.state_dict(), unet.config),
        **vae_to_original(vae.state_dict(), vae.config),
        **text_encoder_to_original(text_encoder.state_dict()),
        **text_encoder_2_to_original(text_encoder_2.state_dict()),
    }


def write_original_checkpoint(folder: Path, out: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write the diffusers SDXL model in `folder` as one original-layout `.safetensors`
    file at `out`, its tensors in `dtype`; returns `out`. Raises ModelFolderError for a
    folder that is not an SDXL model."""
    from safetensors.torch import save_file

    from kiln_server.models.loader import load_modules

    modules = load_modules(folder, dtype)
    state = to_original_layout(
        modules.unet, modules.vae, modules.text_encoder, modules.text_encoder_2
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    """Convert a diffusers SDXL folder to an original-layout single file; exit 2 on a bad
    folder."""
    from kiln_server.models.loader import ModelFolderError

    parser = argparse.ArgumentParser(
        prog="python -m kiln_server.models.original_layout",
        description="Write a diffusers SDXL folder as one original-layout .safetensors file.",
    )
    parser.add_argument("folder", type=Path, help="diffusers SDXL model folder")
    parser.add_argument("out", type=Path, help="the .safetensors file to write")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float16",
        help="precision of the written tensors (default float16, as SDXL checkpoints ship)",
    )
    args = parser.parse_args(argv)
    try:
        write_original_checkpoint(args.folder, args.out, DTYPES[args.dtype])
    except ModelFolderError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
