"""torch modules whose forward signatures match the component declarations exactly.

Each wrapper takes the declared inputs positionally, in declared order, and returns the
declared outputs in order. The torch engine runs them eagerly; ONNX export traces them, so
an exported graph and the eager reference compute the same function.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kiln_server.engines.components import ComponentSpec


class TextEncoderModule(nn.Module):
    """CLIP text encoder returning the penultimate hidden states (SDXL's choice)."""

    def __init__(self, encoder: Any) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        output = self.encoder(input_ids.long(), output_hidden_states=True)
        return output.hidden_states[-2]


class TextEncoderWithProjectionModule(nn.Module):
    """Second CLIP encoder: penultimate hidden states and the projected pooled embedding."""

    def __init__(self, encoder: Any) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.encoder(input_ids.long(), output_hidden_states=True)
        return output.hidden_states[-2], output.text_embeds


class UNetModule(nn.Module):
    """SDXL UNet with the added conditioning passed as plain tensors."""

    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
            return_dict=False,
        )[0]


class VAEDecoderModule(nn.Module):
    """VAE decoder from (unscaled) latents to images in [-1, 1]."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]


class VAEEncoderModule(nn.Module):
    """VAE encoder from images in [-1, 1] to the latent distribution's parameters (mean and
    log-variance on the channel axis)."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images, return_dict=False)[0].parameters


class PreviewDecoderModule(nn.Module):
    """Learned preview decoder: UNet-space latents to images in [-1, 1] at full size.

    `AutoencoderTiny.decode` clamps the latents (tanh) and maps the decoder's [0, 1]
    output to [-1, 1], as `AutoencoderTiny.decode(latent).sample` returns it.
    """

    def __init__(self, decoder: Any) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode(latent, return_dict=False)[0]


def component_module(spec: ComponentSpec, modules: Any) -> nn.Module:
    """The wrapper for `spec.name` around the loaded SDXLModules, in eval mode."""
    builders = {
        "text_encoder": lambda: TextEncoderModule(modules.text_encoder),
        "text_encoder_2": lambda: TextEncoderWithProjectionModule(modules.text_encoder_2),
        "unet": lambda: UNetModule(modules.unet),
        "vae_decoder": lambda: VAEDecoderModule(modules.vae),
        "vae_encoder": lambda: VAEEncoderModule(modules.vae),
        "preview_decoder": lambda: PreviewDecoderModule(modules.preview_decoder),
    }
    if spec.name not in builders:
        raise KeyError(f"no torch module for component {spec.name!r}")
    if spec.name == "preview_decoder" and getattr(modules, "preview_decoder", None) is None:
        raise KeyError("this model has no preview decoder")
    module: nn.Module = builders[spec.name]()
    return module.eval()
