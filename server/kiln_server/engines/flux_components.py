"""One declaration per FLUX component: its tensors, their dtypes and symbolic shapes.

The FLUX counterpart of engines/components.py, built from the same TensorSpec and
ComponentSpec so export, TensorRT profiles and runtime buffers read FLUX declarations as
they read SDXL's. Names and order follow NVIDIA's TensorRT FLUX demo (the transformer's
output is called `noise_pred`, as Kiln's UNet's). FLUX latents are packed: 2x2 patches of
the 16-channel latent become one token of 64 values, so the transformer's image-sized dim
is `image_tokens` = (height / 16) x (width / 16), which FluxComponentSpec resolves beside
the dims ComponentSpec knows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from kiln_server.engines.components import (
    ComponentSpec,
    ModelDims,
    ShapeRequest,
    TensorSpec,
    vae_decoder_spec,
    vae_encoder_spec,
)

# Latent pixels per side of one transformer token (FLUX's 2x2 packing).
PACK = 2
# Positions per token id: (unused, row, column) for images, zeros for text.
ID_AXES = 3
# Symbolic dims that name an image side (ComponentSpec.dim_values).
IMAGE_DIMS = frozenset({"image_height", "image_width", "latent_height", "latent_width"})


@dataclass(frozen=True)
class FluxDims:
    """Sizes of one FLUX-family model that fix the static dims of its components.

    `t5_tokens` is the T5 sequence length the model is served at (diffusers'
    `max_sequence_length`; pads count, so it is fixed per model). `guidance_embeds` says
    whether the transformer takes a distilled guidance scale (dev-style) or not
    (schnell-style).
    """

    latent_channels: int = 16
    vae_scale_factor: int = 8
    clip_hidden_size: int = 768
    clip_tokens: int = 77
    t5_hidden_size: int = 4096
    t5_tokens: int = 512
    guidance_embeds: bool = False
    image_channels: int = 3
    t5_vocab_size: int = 32128

    @property
    def token_channels(self) -> int:
        """Values per packed latent token: the transformer's in_channels (64 for FLUX.1)."""
        return self.latent_channels * PACK * PACK

    @property
    def size_multiple(self) -> int:
        """Pixels an image side must divide by: one token covers 2x2 latent pixels."""
        return self.vae_scale_factor * PACK

    def image_tokens(self, height: int, width: int) -> int:
        """Transformer tokens of a height x width image."""
        return (height // self.size_multiple) * (width // self.size_multiple)

    def vae_dims(self) -> ModelDims:
        """The ModelDims the shared VAE declarations read (channels and scale factor)."""
        return ModelDims(
            latent_channels=self.latent_channels,
            unet_in_channels=self.latent_channels,
            vae_scale_factor=self.vae_scale_factor,
            image_channels=self.image_channels,
        )


@dataclass(frozen=True)
class FluxComponentSpec(ComponentSpec):
    """A ComponentSpec whose symbolic dims include `image_tokens` (packed latent tokens)."""

    flux: FluxDims = FluxDims()

    def dim_values(self, request: ShapeRequest) -> dict[str, int]:
        """ComponentSpec's values plus `image_tokens` for the request's image size."""
        values = super().dim_values(request)
        values["image_tokens"] = self.flux.image_tokens(request.height, request.width)
        return values

    def request_for(self, batch: int, values: Mapping[str, int]) -> ShapeRequest:
        """ComponentSpec's request, except for a call whose only image-sized dim is
        `image_tokens` (the transformer): the token count fixes every shape but not the
        sides, so the request is the one-token-wide image of that many tokens, which has
        the same shapes as every other image of that token count."""
        if "image_tokens" in values and not values.keys() & IMAGE_DIMS:
            side = self.flux.size_multiple
            return ShapeRequest(batch=batch, height=side * values["image_tokens"], width=side)
        return super().request_for(batch, values)

    def describe_call(self, request: ShapeRequest) -> str:
        """ComponentSpec's description; the transformer's names its token count (its
        requests are one token wide, see `request_for`)."""
        if self.name == "transformer":
            tokens = self.flux.image_tokens(request.height, request.width)
            return f"batch {request.batch} of {tokens} image tokens"
        return super().describe_call(request)


def clip_pooled_spec(dims: FluxDims) -> FluxComponentSpec:
    """CLIP text encoder (CLIP-L on FLUX.1): token ids to its pooled output (the hidden
    state at the end token), which FLUX takes as `pooled_projections`."""
    return FluxComponentSpec(
        name="text_encoder",
        inputs=(TensorSpec("input_ids", "int32", ("batch", dims.clip_tokens)),),
        outputs=(TensorSpec("pooled", "float32", ("batch", dims.clip_hidden_size)),),
        dims=dims.vae_dims(),
        image_sized=False,
        flux=dims,
    )


def t5_encoder_spec(dims: FluxDims) -> FluxComponentSpec:
    """T5 encoder: token ids (padded to `t5_tokens`, no attention mask, as diffusers) to
    its last hidden states, the transformer's `encoder_hidden_states`."""
    return FluxComponentSpec(
        name="text_encoder_2",
        inputs=(TensorSpec("input_ids", "int32", ("batch", dims.t5_tokens)),),
        outputs=(
            TensorSpec("hidden_states", "float32", ("batch", dims.t5_tokens, dims.t5_hidden_size)),
        ),
        dims=dims.vae_dims(),
        image_sized=False,
        vocab_size=dims.t5_vocab_size,
        flux=dims,
    )


def flux_transformer_spec(dims: FluxDims) -> FluxComponentSpec:
    """FLUX transformer: the velocity of every packed latent token, each row with its own
    timestep (t / 1000) so one call advances requests at different steps. Position ids are
    shared by the rows (2-D, as diffusers takes them), so a call's rows share image size and
    T5 length. A dev-style model also takes each row's distilled guidance scale."""
    tokens = ("batch", "image_tokens", dims.token_channels)
    inputs = [
        TensorSpec("hidden_states", "float32", tokens),
        TensorSpec(
            "encoder_hidden_states", "float32", ("batch", dims.t5_tokens, dims.t5_hidden_size)
        ),
        TensorSpec("pooled_projections", "float32", ("batch", dims.clip_hidden_size)),
        TensorSpec("timestep", "float32", ("batch",)),
        TensorSpec("img_ids", "float32", ("image_tokens", ID_AXES)),
        TensorSpec("txt_ids", "float32", (dims.t5_tokens, ID_AXES)),
    ]
    if dims.guidance_embeds:
        inputs.append(TensorSpec("guidance", "float32", ("batch",)))
    return FluxComponentSpec(
        name="transformer",
        inputs=tuple(inputs),
        outputs=(TensorSpec("noise_pred", "float32", tokens),),
        dims=dims.vae_dims(),
        flux=dims,
    )


FLUX_COMPONENT_NAMES = (
    "text_encoder",
    "text_encoder_2",
    "transformer",
    "vae_decoder",
    "vae_encoder",
)


def flux_component_specs(dims: FluxDims) -> dict[str, ComponentSpec]:
    """Every component of a FLUX-family model, keyed by name, in FLUX_COMPONENT_NAMES
    order. The VAE declarations are SDXL's at 16 latent channels: the decoder takes
    unscaled latents (the pipeline applies scale and shift), the encoder returns the
    distribution's parameters."""
    vae = dims.vae_dims()
    return {
        "text_encoder": clip_pooled_spec(dims),
        "text_encoder_2": t5_encoder_spec(dims),
        "transformer": flux_transformer_spec(dims),
        "vae_decoder": _of_flux(vae_decoder_spec(vae), dims),
        "vae_encoder": _of_flux(vae_encoder_spec(vae), dims),
    }


def _of_flux(spec: ComponentSpec, dims: FluxDims) -> FluxComponentSpec:
    """`spec` as a FluxComponentSpec, so every FLUX declaration says its family (the
    TensorRT build picks precisions by it)."""
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    return FluxComponentSpec(**fields, flux=dims)
