"""SDXL base 1.0's full-size architecture with deterministic random weights, for measuring.

`kiln-sdxl-base-arch` has exactly the published architecture of
stabilityai/stable-diffusion-xl-base-1.0 (UNet 2.567 B parameters, CLIP ViT-L and OpenCLIP
bigG text encoders, the 8x VAE, the Euler scheduler config) but random weights: it draws
noise. It exists so that speed, memory and start-up can be measured on the real shapes
without downloading anything. It is generated on demand into the cache in the diffusers
layout as fp16 safetensors (about 7 GB) and loaded like any SDXL folder.

Weights. Every tensor is a pure function of its component, its parameter name and
WEIGHT_SEED: a counter-based hash of the element index, seeded from SHA-256 of the name, so
the values depend neither on creation order nor on the device that computes them: integer
hashing and correctly rounded float steps make a folder generated on a GPU byte-identical
to one generated on the CPU. The distributions are
PyTorch's defaults for each layer type, which keep activations well inside the fp16 range:
- Linear and Conv weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (what
  `reset_parameters` draws: kaiming_uniform with a=sqrt(5), and the matching bias bound);
- Embedding: U(-sqrt(3), sqrt(3)), unit variance like nn.Embedding's N(0, 1);
- LayerNorm and GroupNorm: weight 1, bias 0.

Memory. The networks are built on the `meta` device (shapes only); tensors are generated
one at a time on `device` and streamed into the safetensors files, so no component is ever
held whole, in fp32 or otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import struct
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln_server.models.clip_vocabulary import sdxl_tokenizers
from kiln_server.models.layout import staged_folder, write_model_index
from kiln_server.models.tiny_sdxl import SCHEDULER_CONFIG

SDXL_BASE_ARCH_NAME = "kiln-sdxl-base-arch"
# Bump when the weight generator changes, so cached copies are rebuilt (config changes
# already change the fingerprint).
SDXL_BASE_ARCH_REVISION = 1
WEIGHT_SEED = 20261124

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (every architectural key).
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": True,
    "upcast_attention": None,
    "resnet_time_scale_shift": "default",
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "addition_embed_type_num_heads": 64,
    "projection_class_embeddings_input_dim": 2816,
    "time_embedding_type": "positional",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
}

# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json.
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

# text_encoder/config.json: OpenAI CLIP ViT-L/14's text tower. The token ids (bos 0, eos 2)
# are the published file's; transformers then pools at the highest token id, the end token.
TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "projection_dim": 768,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

# text_encoder_2/config.json: OpenCLIP ViT-bigG/14's text tower with its projection.
TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    **TEXT_ENCODER_CONFIG,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

KILN_DEFAULTS: dict[str, Any] = {
    "family": "sdxl",
    "description": (
        "SDXL base 1.0 architecture, random weights: draws noise; "
        "for measuring speed, memory and start-up"
    ),
    "draws_noise": True,
    "default_width": 1024,
    "default_height": 1024,
    "default_num_inference_steps": 30,
    "default_guidance_scale": 5.0,
    "default_scheduler": "K_EULER",
    "min_size": 512,
    "max_size": 2048,
    "max_num_outputs": 8,
}

# madebyollin/taesdxl's architecture (diffusers' AutoencoderTiny defaults): the learned
# preview decoder real SDXL deployments point `preview_decoder` at, so its cost is
# measured on the real shapes.
PREVIEW_DECODER_CONFIG: dict[str, Any] = {}

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class Architecture:
    """The configs a model folder is generated from: SDXL base's unless a test shrinks them."""

    unet: dict[str, Any] = field(default_factory=lambda: dict(UNET_CONFIG))
    vae: dict[str, Any] = field(default_factory=lambda: dict(VAE_CONFIG))
    text_encoder: dict[str, Any] = field(default_factory=lambda: dict(TEXT_ENCODER_CONFIG))
    text_encoder_2: dict[str, Any] = field(default_factory=lambda: dict(TEXT_ENCODER_2_CONFIG))
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SCHEDULER_CONFIG))
    kiln: dict[str, Any] = field(default_factory=lambda: dict(KILN_DEFAULTS))
    preview_decoder: dict[str, Any] = field(default_factory=lambda: dict(PREVIEW_DECODER_CONFIG))

    def fingerprint(self) -> str:
        """Names these exact weights and configs: a hash of the revision, the seed and every
        config except Kiln's serving defaults (kiln.json can change without regenerating)."""
        blob = json.dumps(
            [
                SDXL_BASE_ARCH_REVISION,
                WEIGHT_SEED,
                self.unet,
                self.vae,
                self.text_encoder,
                self.text_encoder_2,
                self.scheduler,
                self.preview_decoder,
            ],
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


SDXL_BASE = Architecture()


@dataclass(frozen=True)
class Component:
    """One network of the folder: its subfolder, its module on `meta`, its weights file."""

    subfolder: str
    module: nn.Module
    weights_file: str

    @property
    def num_bytes(self) -> int:
        """Size of its fp16 weights."""
        return 2 * sum(p.numel() for p in self.module.parameters())


@dataclass(frozen=True)
class Init:
    """How one parameter is filled: 'uniform' in [-bound, bound), 'ones' or 'zeros'."""

    kind: str
    bound: float = 0.0


def meta_components(arch: Architecture = SDXL_BASE) -> list[Component]:
    """The networks of `arch` built on the `meta` device: shapes, no storage."""
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet: Any = UNet2DConditionModel(**arch.unet)
        vae: Any = AutoencoderKL(**arch.vae)
        preview_decoder: Any = AutoencoderTiny(**arch.preview_decoder)
        text_encoder = CLIPTextModel(CLIPTextConfig(**arch.text_encoder))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**arch.text_encoder_2))
    return [
        Component("unet", unet, DIFFUSERS_WEIGHTS),
        Component("vae", vae, DIFFUSERS_WEIGHTS),
        Component("text_encoder", text_encoder, TRANSFORMERS_WEIGHTS),
        Component("text_encoder_2", text_encoder_2, TRANSFORMERS_WEIGHTS),
        Component("preview_decoder", preview_decoder, DIFFUSERS_WEIGHTS),
    ]


def parameter_inits(module: nn.Module) -> dict[str, Init]:
    """The Init of every parameter of `module`, by state-dict name (see the module doc).

    Raises TypeError naming a parameter whose layer type has no rule, so a new layer type
    cannot silently get an arbitrary scale.
    """
    inits: dict[str, Init] = {}
    for module_name, layer in module.named_modules():
        for param_name, _ in layer.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(layer, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
                fan_in = math.prod(layer.weight.shape[1:])
                inits[name] = Init("uniform", 1.0 / math.sqrt(fan_in))
            elif isinstance(layer, nn.Embedding):
                inits[name] = Init("uniform", math.sqrt(3.0))
            elif isinstance(layer, nn.LayerNorm | nn.GroupNorm):
                inits[name] = Init("ones" if param_name == "weight" else "zeros")
            else:
                raise TypeError(f"no weight rule for {name} ({type(layer).__name__})")
    return inits


def parameter_seed(component: str, name: str) -> int:
    """A 64-bit seed for one parameter from SHA-256 of WEIGHT_SEED, component and name."""
    key = f"{WEIGHT_SEED}:{component}:{name}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little")


_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31: a 32-bit value times one stays below 2**63, so the int64
# arithmetic never overflows and gives the same bits on every device.
_MULTIPLIER_1 = 0x7FEB352D
_MULTIPLIER_2 = 0x5BD1E995


def _mix32_(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Hash each element of `x` (int64, each < 2**32) in place: xorshift-multiply rounds."""
    for shift, multiplier in ((16, _MULTIPLIER_1), (15, _MULTIPLIER_2)):
        x.bitwise_xor_(torch.bitwise_right_shift(x, shift, out=scratch))
        x.mul_(multiplier).bitwise_and_(_MASK32)
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=scratch))


def uniform_fp16(
    seed: int, numel: int, bound: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """`numel` fp16 values in [-bound, bound) on `device`, a pure function of the arguments.

    Integer hashing of each element's index and exact float steps make the values
    bit-identical on every device. Works through the tensor in chunks small enough to stay
    in a CPU's cache (the whole-tensor version runs ten times slower there).
    """
    device = torch.device(device)
    chunk = max(1, min(numel, 1 << 18 if device.type == "cpu" else 1 << 24))
    out = torch.empty(numel, dtype=torch.float16, device=device)
    bits = torch.empty(chunk, dtype=torch.int64, device=device)
    scratch = torch.empty_like(bits)
    for start in range(0, numel, chunk):
        stop = min(numel, start + chunk)
        x, tmp = bits[: stop - start], scratch[: stop - start]
        torch.arange(start, stop, out=x)
        _mix32_(x.bitwise_xor_(seed & _MASK32), tmp)
        _mix32_(x.bitwise_xor_((seed >> 32) & _MASK32), tmp)
        # The top 24 bits as k * 2**-23 - 1 in [-1, 1): exact in float32.
        unit = x.bitwise_right_shift_(8).to(torch.float32).mul_(2.0 / (1 << 24)).sub_(1.0)
        out[start:stop] = unit.mul_(bound)
    return out


def parameter_values(
    component: str,
    name: str,
    shape: Sequence[int],
    init: Init,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The fp16 tensor of one parameter, created on `device`; same arguments, same values."""
    if init.kind == "ones":
        return torch.ones(tuple(shape), dtype=torch.float16, device=device)
    if init.kind == "zeros":
        return torch.zeros(tuple(shape), dtype=torch.float16, device=device)
    values = uniform_fp16(parameter_seed(component, name), math.prod(shape), init.bound, device)
    return values.reshape(tuple(shape))


def _write_fp16_safetensors(
    path: Path, component: Component, device: torch.device | str, progress: Any
) -> None:
    """Stream the component's generated weights into one safetensors file.

    safetensors.torch.save_file needs every tensor in memory at once (and a bytes copy of
    each): 10 GB for the UNet. The format is simple enough to write tensor by tensor: an
    8-byte little-endian header length, a JSON header of names, dtypes, shapes and byte
    offsets, then the raw little-endian data in header order.
    """
    shapes = {name: tuple(tensor.shape) for name, tensor in component.module.state_dict().items()}
    inits = parameter_inits(component.module)
    if set(shapes) != set(inits):
        raise TypeError(
            f"{component.subfolder}: state entries without a weight rule: "
            f"{sorted(set(shapes) ^ set(inits))}"
        )
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(shapes):
        size = 2 * math.prod(shapes[name])
        header[name] = {
            "dtype": "F16",
            "shape": list(shapes[name]),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(blob)))
        handle.write(blob)
        for name in sorted(shapes):
            values = parameter_values(component.subfolder, name, shapes[name], inits[name], device)
            data = values.cpu().contiguous().view(torch.uint8).numpy()
            handle.write(data.data)
            progress.update(data.nbytes)


def _write_config(component: Component, folder: Path) -> None:
    """The component's config.json, as diffusers or transformers would save it."""
    module: Any = component.module
    if component.weights_file == DIFFUSERS_WEIGHTS:
        module.save_config(folder)
        return
    config = module.config
    config.architectures = [type(module).__name__]
    config.dtype = "float16"
    config.save_pretrained(folder)


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the block with one intra-op torch thread when `device` is the CPU.

    The generator works in cache-sized chunks, where a second thread gains little; on a
    busy 2-core machine, OpenMP threads waiting on each other made it 5-20x slower.
    """
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def write_sdxl_base_arch(
    folder: Path,
    device: torch.device | str = "cpu",
    arch: Architecture = SDXL_BASE,
    progress: bool = True,
) -> Path:
    """Generate the model of `arch` into `folder` (diffusers layout, fp16 safetensors).

    One tensor at a time is created on `device` and streamed to disk; the folder appears
    only when complete (a crash leaves any previous copy as it was). A tqdm bar on stderr
    counts the bytes written unless `progress` is False. Returns `folder`.
    """
    from diffusers import EulerDiscreteScheduler
    from tqdm import tqdm

    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian data; this host is big-endian")
    components = meta_components(arch)
    with (
        _one_cpu_thread(torch.device(device)),
        staged_folder(folder) as staging,
        tqdm(
            total=sum(c.num_bytes for c in components),
            desc=f"generating {folder.name}",
            unit="B",
            unit_scale=True,
            file=sys.stderr,
            disable=not progress,
        ) as bar,
    ):
        for component in components:
            bar.set_postfix_str(component.subfolder)
            _write_config(component, staging / component.subfolder)
            _write_fp16_safetensors(
                staging / component.subfolder / component.weights_file, component, device, bar
            )
        tokenizer, tokenizer_2 = sdxl_tokenizers()
        tokenizer.save_pretrained(staging / "tokenizer")
        tokenizer_2.save_pretrained(staging / "tokenizer_2")
        EulerDiscreteScheduler.from_config(arch.scheduler).save_pretrained(staging / "scheduler")
        write_model_index(staging)
        # kiln.json last: its fingerprint is the marker of a complete, current folder.
        (staging / "kiln.json").write_text(_kiln_json(arch))
    return folder


def _kiln_json(arch: Architecture) -> str:
    return json.dumps({**arch.kiln, "fingerprint": arch.fingerprint()}, indent=2)


def is_current(folder: Path, arch: Architecture = SDXL_BASE) -> bool:
    """Whether `folder` holds a complete model generated from `arch` by this revision."""
    try:
        kiln = json.loads((folder / "kiln.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(kiln, dict)
        and kiln.get("fingerprint") == arch.fingerprint()
        and (folder / "model_index.json").is_file()
    )


def ensure_sdxl_base_arch(models_dir: Path, device: torch.device | str = "cpu") -> Path:
    """Folder of `kiln-sdxl-base-arch` under `models_dir`, generated first if absent or stale.

    A complete folder of the current fingerprint is reused as is (only its kiln.json is
    rewritten when Kiln's serving defaults changed). Generation writes about 7 GB: about
    two minutes on 2 CPU cores, mostly disk time with `device="cuda"`; the weights are the
    same on either.
    """
    folder = models_dir / SDXL_BASE_ARCH_NAME
    if not is_current(folder, SDXL_BASE):
        write_sdxl_base_arch(folder, device, SDXL_BASE)
    elif (folder / "kiln.json").read_text() != _kiln_json(SDXL_BASE):
        # Only the serving defaults changed; kiln.json is outside the content hash.
        staged = folder / ".kiln.json.tmp"
        staged.write_text(_kiln_json(SDXL_BASE))
        staged.replace(folder / "kiln.json")
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m kiln_server.models.sdxl_base_arch [--cache-dir DIR] [--device cuda]`."""
    from kiln_server.models.registry import default_cache_dir

    parser = argparse.ArgumentParser(
        description=f"Generate {SDXL_BASE_ARCH_NAME} (SDXL base 1.0's architecture, random "
        "fp16 weights) into the Kiln cache and print its folder."
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: the Kiln cache")
    parser.add_argument("--device", default="cpu", help="where to compute the weights")
    args = parser.parse_args(argv)
    cache_dir = args.cache_dir or default_cache_dir()
    print(ensure_sdxl_base_arch(cache_dir / "models", torch.device(args.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
