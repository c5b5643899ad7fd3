"""Step cost of per-row LoRAs: one UNet call for 8 requests with 4 different LoRAs against
the same call with none.

    .venv/bin/python benchmarks/lora_rows.py [--model DIR] [--device cpu|cuda] [--rank 16]

The UNet (a diffusers folder; default the tiny SDXL model) is called for 8 requests under
classifier-free guidance (16 rows) at the model's default latent size. Three timings,
medians over `--repeats` calls after warm-up: the plain UNet; the UNet with Kiln's per-row
layers installed but no LoRA in the batch; and with 4 resident rank-`--rank` LoRAs on the
attention projections (to_q, to_k, to_v, to_out.0), two requests each. The ratio mixed /
plain is what the issue's goal (at most 1.15x) is about; on the tiny model on a CPU the
LoRA work is large relative to the base layers, so only GPU runs of a full-size model say
something about that goal. Nothing is written to RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kiln_server.lora.layers import install_row_lora
from kiln_server.lora.stack import AdapterStack, LoraUse
from kiln_server.lora.weights import LoraModule, LoraWeights

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
REQUESTS = 8


def random_lora(unet: Any, name: str, rank: int, seed: int) -> LoraWeights:
    """A LoRA of `rank` on every attention projection of `unet`, random weights."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for module_name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and module_name.endswith(TARGETS):
            modules[module_name] = LoraModule(
                down=torch.randn(rank, module.in_features, generator=generator) * 0.01,
                up=torch.randn(module.out_features, rank, generator=generator) * 0.01,
                scale=1.0,
            )
    return LoraWeights(name=name, source_format="diffusers", unet=modules)


def timed(call: Any, device: torch.device, repeats: int) -> float:
    """Median seconds of `call()` after two warm-up calls."""
    samples = []
    for index in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= 2:
            samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="diffusers SDXL folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import UNet2DConditionModel

    model = args.model
    if model is None:
        from kiln_server.models.tiny_sdxl import ensure_tiny_sdxl

        model = ensure_tiny_sdxl(Path(tempfile.gettempdir()) / "kiln-bench-models")
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet = UNet2DConditionModel.from_pretrained(model / "unet").eval().to(device, dtype)
    config = unet.config
    rows = 2 * REQUESTS
    size = int(config.sample_size)
    context = int(config.cross_attention_dim)
    pooled = int(config.projection_class_embeddings_input_dim) - 6 * int(
        config.addition_time_embed_dim
    )
    raw: dict[str, Any] = {
        "sample": torch.randn(rows, int(config.in_channels), size, size),
        "timestep": torch.full((rows,), 500.0),
        "encoder_hidden_states": torch.randn(rows, 77, context),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(rows, pooled),
            "time_ids": torch.tensor(
                [[size * 8.0, size * 8.0, 0, 0, size * 8.0, size * 8.0]] * rows
            ),
        },
    }
    inputs: dict[str, Any] = {
        key: (
            {k: v.to(device, dtype) for k, v in value.items()}
            if isinstance(value, dict)
            else value.to(device, dtype)
        )
        for key, value in raw.items()
    }

    def call() -> None:
        with torch.no_grad():
            unet(**inputs, return_dict=False)

    names = [f"lora-{index}" for index in range(4)]
    loras = [random_lora(unet, name, args.rank, index) for index, name in enumerate(names)]
    plain = timed(call, device, args.repeats)
    stack = AdapterStack(install_row_lora(unet), capacity=4, max_rank=args.rank)
    installed = timed(call, device, args.repeats)
    for lora in loras:
        stack.load(lora)
    per_request = [[LoraUse(names[request // 2], 1.0)] for request in range(REQUESTS)]
    stack.assign([uses for uses in per_request for _ in range(2)])
    mixed = timed(call, device, args.repeats)
    print(f"model {model}, device {device}, {rows} rows, rank {args.rank}")
    print(f"plain UNet step:                 {plain * 1000:8.2f} ms")
    print(f"layers installed, no LoRA:       {installed * 1000:8.2f} ms ({installed / plain:.2f}x)")
    print(f"4 LoRAs over 8 requests (mixed): {mixed * 1000:8.2f} ms ({mixed / plain:.2f}x)")
    print(f"adapter stack memory:            {stack.memory_bytes() / 2**20:8.3f} MiB")


if __name__ == "__main__":
    main()
