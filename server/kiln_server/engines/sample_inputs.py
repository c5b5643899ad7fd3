"""Seeded, realistic random inputs for any component: export, validation and warm-up use them.

Values follow what the pipeline feeds each tensor (token ids that start with BOS and end
with EOS then padding, timesteps in the training range, SDXL's six size/crop ids), so a
graph is exercised on the paths real requests take.
"""

from __future__ import annotations

import torch

from kiln_server.engines.components import (
    LORA_DOWN_PREFIX,
    LORA_SCALES_INPUT,
    LORA_SLOTS_INPUT,
    LORA_UP_PREFIX,
    ComponentSpec,
    ShapeRequest,
)

CLIP_VOCAB_SIZE = 49408
BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
NUM_TRAIN_TIMESTEPS = 1000
LORA_WEIGHT_SCALE = 0.05


def _token_ids(
    shape: tuple[int, ...], generator: torch.Generator, vocab_size: int | None = None
) -> torch.Tensor:
    rows, length = shape
    if vocab_size is not None:  # not CLIP's (T5): any ids of its vocabulary, no BOS
        return torch.randint(0, vocab_size, (rows, length), generator=generator)
    ids = torch.full((rows, length), EOS_TOKEN_ID, dtype=torch.int64)
    ids[:, 0] = BOS_TOKEN_ID
    for row in range(rows):
        words = int(torch.randint(1, length - 1, (1,), generator=generator))
        ids[row, 1 : 1 + words] = torch.randint(0, BOS_TOKEN_ID, (words,), generator=generator)
    return ids


def _time_ids(rows: int, request: ShapeRequest, count: int) -> torch.Tensor:
    # SDXL's added conditioning: original size, crop top-left, target size.
    base = [request.height, request.width, 0, 0, request.height, request.width]
    values = (base * (count // len(base) + 1))[:count]
    return torch.tensor([values] * rows, dtype=torch.float32)


def sample_inputs(
    spec: ComponentSpec, request: ShapeRequest, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Fresh inputs for one call of `spec` at `request`'s size, identical for equal seeds.

    Every declared input is present, with its declared dtype and shape, contiguous on the CPU.
    """
    generator = torch.Generator().manual_seed(seed)
    inputs: dict[str, torch.Tensor] = {}
    for tensor in spec.inputs:
        shape = spec.shape(tensor.name, request)
        dtype = getattr(torch, tensor.dtype)
        if tensor.name == "input_ids":
            value = _token_ids(shape, generator, spec.vocab_size)
        elif tensor.name == "timestep":
            value = torch.rand(shape, generator=generator) * (NUM_TRAIN_TIMESTEPS - 1)
        elif tensor.name == "time_ids":
            value = _time_ids(shape[0], request, shape[1])
        elif tensor.name == "images":
            value = torch.rand(shape, generator=generator) * 2 - 1
        elif tensor.name == LORA_SLOTS_INPUT:
            # Any slot, the all-zero slot 0 ("no LoRA") included.
            slots = spec.lora.slots + 1 if spec.lora is not None else 1
            value = torch.randint(0, slots, shape, generator=generator)
        elif tensor.name == LORA_SCALES_INPUT:
            value = torch.rand(shape, generator=generator) * 2 - 0.5
        elif tensor.name.startswith((LORA_DOWN_PREFIX, LORA_UP_PREFIX)):
            # LoRA weights are small (trained from zero); slot 0 stays all zero.
            value = torch.randn(shape, generator=generator) * LORA_WEIGHT_SCALE
            value[0] = 0
        elif dtype.is_floating_point:
            value = torch.randn(shape, generator=generator)
        else:
            value = torch.randint(0, 2, shape, generator=generator)
        inputs[tensor.name] = value.to(dtype).contiguous()
    return inputs
