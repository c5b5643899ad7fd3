"""Reading one LoRA file into `LoraWeights`, with diffusers' own converters.

Accepted: diffusers/PEFT files (keys `unet.<module>.lora_A.weight` / `.lora.down.weight`,
with the adapter config diffusers stores in the file's metadata) and kohya / A1111
(Civitai) files (keys `lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`,
in diffusers or SGM block naming), converted by
`StableDiffusionXLPipeline.lora_state_dict` exactly as `load_lora_weights` converts them.
The file is read here with safetensors and handed to diffusers as a dict, so diffusers
never resolves a path or reaches the hub.

The scale of each module is what PEFT applies when diffusers loads the same file: the
adapter config diffusers builds (from the file's metadata, or from kohya's `.alpha` values,
or alpha = r when neither exists) gives each module r and alpha, with rank and alpha
patterns matched as PEFT matches them; scale = alpha / r (alpha / sqrt(r) for rsLoRA).

Text-encoder weights (diffusers/PEFT `text_encoder.*` / `text_encoder_2.*`, kohya
`lora_te1_*` / `lora_te2_*`, or `lora_te_*` for the first encoder) are converted by the same
converters and kept apart per encoder in `LoraWeights.text_encoders`, with the scales PEFT
gives them; whether a model applies them is the adapter stack's business. Their module
names drop the `text_model.` level, as diffusers does for transformers' flattened CLIP
models, so files written for either CLIP layout name the same modules.

Refused, with a message naming the file and why: LoHa (`hada_` keys), LoKr (`lokr_`),
DoRA (`dora_scale`, `lora_magnitude_vector`), LoRA biases, anything that is not a LoRA
weight, and ranks above `max_rank`. Refused kinds are found from the key names before any
tensor is read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from kiln_server.lora.errors import LoraRefused
from kiln_server.lora.weights import LoraModule, LoraWeights

UNET_PREFIX = "unet"
TEXT_ENCODER_PREFIXES = ("text_encoder", "text_encoder_2")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
TEXT_MODEL_PREFIX = "text_model."
"""The CLIP level older transformers (and LoRA files written for them) name modules under;
text-encoder module names are given without it."""
ADAPTER_METADATA_KEY = "lora_adapter_metadata"

# Key fragments of adapter kinds Kiln does not apply, with the name given in the refusal.
REFUSED_KINDS: tuple[tuple[str, str], ...] = (
    ("hada_", "LoHa"),
    ("lokr_", "LoKr"),
    ("dora_scale", "DoRA"),
    ("lora_magnitude_vector", "DoRA"),
)


def refused_kind(keys: list[str]) -> str | None:
    """The name of the unsupported adapter kind the keys belong to, or None for LoRA."""
    for fragment, kind in REFUSED_KINDS:
        if any(fragment in key for key in keys):
            return kind
    return None


def _read_safetensors(path: Path, label: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of the file; refuses other adapter kinds before loading tensors."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = list(handle.keys())
            kind = refused_kind(keys)
            if kind is not None:
                raise LoraRefused(label, f"it is a {kind} file; only plain LoRA files are applied")
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in keys}
    except (OSError, SafetensorError, ValueError, RuntimeError) as error:
        raise LoraRefused(label, f"not a readable .safetensors file ({error})") from None
    return tensors, metadata


def _adapter_metadata(metadata: Mapping[str, str], label: str) -> dict[str, Any] | None:
    """diffusers' adapter configs stored in the file (keys `<component>.<LoraConfig field>`)."""
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if not raw:
        return None
    try:
        parsed = json.loads(raw)
    except ValueError:
        raise LoraRefused(label, f"its '{ADAPTER_METADATA_KEY}' metadata is not JSON") from None
    return parsed if isinstance(parsed, dict) and parsed else None


def _component(mapping: Mapping[str, Any] | None, prefix: str) -> dict[str, Any] | None:
    """The entries of `mapping` under `prefix.`, with the prefix removed (None when empty)."""
    if not mapping:
        return None
    start = f"{prefix}."
    part = {k.removeprefix(start): v for k, v in mapping.items() if k.startswith(start)}
    return part or None


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """The value PEFT uses for `module`: the first pattern matching its name, else default."""
    from peft.utils.other import get_pattern_key

    if not patterns:
        return default
    key = get_pattern_key(list(patterns), module)
    return patterns.get(key, default)


def _to_peft(state_dict: dict[str, torch.Tensor], *, is_unet: bool) -> dict[str, torch.Tensor]:
    """One component's keys in PEFT naming (`<module>.lora_A.weight`), as diffusers does."""
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if is_unet:
        if "lora_A" in next(iter(state_dict)):
            return state_dict
        return dict(convert_unet_state_dict_to_peft(state_dict))
    return dict(convert_state_dict_to_peft(convert_state_dict_to_diffusers(state_dict)))


def _modules(
    label: str,
    state_dict: dict[str, torch.Tensor],
    network_alphas: Mapping[str, Any] | None,
    metadata: dict[str, Any] | None,
    *,
    is_unet: bool,
) -> dict[str, LoraModule]:
    """Normalise one component (PEFT-named keys) into modules with PEFT's scales."""
    from diffusers.utils.peft_utils import _create_lora_config

    rank_key = "^{}" if is_unet else "{}"
    ranks = {
        rank_key.format(key): int(value.shape[1])
        for key, value in state_dict.items()
        if "lora_B" in key and value.ndim > 1
    }
    try:
        config = _create_lora_config(state_dict, network_alphas, metadata, ranks, is_unet=is_unet)
    except (TypeError, ValueError, IndexError) as error:
        raise LoraRefused(label, f"its adapter configuration is not usable ({error})") from None
    if getattr(config, "use_dora", False):
        raise LoraRefused(label, "it is a DoRA file; only plain LoRA files are applied")
    if getattr(config, "lora_bias", False):
        raise LoraRefused(label, "it trains LoRA biases, which Kiln does not apply")

    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        module, sep, part = key.partition(".lora_")
        if not sep or part not in ("A.weight", "B.weight"):
            raise LoraRefused(label, f"key '{key[:120]}' is not a LoRA down or up weight")
        grouped.setdefault(module, {})[part[0]] = value
    modules: dict[str, LoraModule] = {}
    for module, parts in grouped.items():
        if set(parts) != {"A", "B"}:
            raise LoraRefused(label, f"module '{module[:120]}' lacks its down or up weight")
        down, up = parts["A"].to(torch.float32), parts["B"].to(torch.float32)
        if up.ndim == 4:
            up = up.reshape(up.shape[0], up.shape[1])
        if down.ndim not in (2, 4) or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise LoraRefused(label, f"module '{module[:120]}' has mismatched LoRA shapes")
        r = int(_pattern_value(config.rank_pattern or {}, module, config.r))
        if r != down.shape[0]:
            raise LoraRefused(
                label, f"module '{module[:120]}' has rank {down.shape[0]} but its config says {r}"
            )
        alpha = float(_pattern_value(config.alpha_pattern or {}, module, config.lora_alpha))
        denominator = math.sqrt(r) if getattr(config, "use_rslora", False) else r
        modules[module] = LoraModule(
            down=down.contiguous(), up=up.contiguous(), scale=alpha / denominator
        )
    return modules


def read_lora_file(
    path: Path, *, max_rank: int, name: str | None = None, unet_config: Any = None
) -> LoraWeights:
    """Read and normalise the LoRA file at `path` (already resolved inside the folders).

    `name` is how errors and the result name it (default: the file name); `unet_config`
    is the target UNet's config, which diffusers needs to map SGM-named kohya blocks.
    Raises `LoraRefused` naming the file and the reason for anything not applied.
    """
    from diffusers import StableDiffusionXLPipeline

    label = name or path.name
    tensors, file_metadata = _read_safetensors(path, label)
    if not tensors:
        raise LoraRefused(label, "the file holds no tensors")
    kohya = all(key.startswith(KOHYA_PREFIXES) for key in tensors)
    adapter_metadata = None if kohya else _adapter_metadata(file_metadata, label)
    try:
        state_dict, network_alphas = StableDiffusionXLPipeline.lora_state_dict(
            dict(tensors), unet_config=unet_config
        )
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise LoraRefused(label, f"diffusers cannot convert its keys ({error})") from None
    known = (UNET_PREFIX, *TEXT_ENCODER_PREFIXES)
    strays = [key for key in state_dict if key.split(".", 1)[0] not in known]
    if strays:
        raise LoraRefused(label, f"key '{strays[0][:120]}' belongs to no UNet or text encoder LoRA")

    def component(prefix: str, is_unet: bool) -> dict[str, LoraModule]:
        part = _component(state_dict, prefix)
        if not part:
            return {}
        kind = refused_kind(list(part))
        if kind is not None:
            raise LoraRefused(label, f"it is a {kind} file; only plain LoRA files are applied")
        alphas = _component(network_alphas, prefix)
        try:
            peft_named = _to_peft(part, is_unet=is_unet)
        except (ValueError, KeyError) as error:
            raise LoraRefused(
                label, f"diffusers cannot convert its {prefix} keys ({error})"
            ) from None
        if not is_unet:
            peft_named = {k.removeprefix(TEXT_MODEL_PREFIX): v for k, v in peft_named.items()}
        return _modules(
            label,
            peft_named,
            alphas,
            _component(adapter_metadata, prefix),
            is_unet=is_unet,
        )

    unet = component(UNET_PREFIX, True)
    encoders = {prefix: component(prefix, False) for prefix in TEXT_ENCODER_PREFIXES}
    weights = LoraWeights(
        name=label,
        source_format="kohya" if kohya else "diffusers",
        unet=unet,
        text_encoders={prefix: modules for prefix, modules in encoders.items() if modules},
    )
    if weights.rank == 0:
        raise LoraRefused(label, "the file holds no LoRA weights")
    if weights.rank > max_rank:
        raise LoraRefused(
            label, f"its rank {weights.rank} is above the maximum LoRA rank {max_rank}"
        )
    return weights
