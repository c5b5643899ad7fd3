"""One declaration per model component: its tensors, their dtypes and symbolic shapes.

ONNX export (names, dynamic axes), TensorRT builds (optimization profiles), and runtime
buffer allocation all read these declarations; nothing else restates a shape. Shapes are
written with symbolic dimensions that `ShapeRequest` resolves from a batch size and an image
size, in the spirit of NVIDIA's TensorRT diffusion demo (one class per component).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

Dim = str | int


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor: numpy dtype name and dims (ints are static, strings symbolic)."""

    name: str
    dtype: str
    dims: tuple[Dim, ...]

    @property
    def numpy_dtype(self) -> np.dtype:
        """The dtype as a numpy dtype object."""
        return np.dtype(self.dtype)


@dataclass(frozen=True)
class ModelDims:
    """Sizes of one SDXL-family model that fix the static dims of its components."""

    latent_channels: int = 4
    # The UNet's input channels: latent_channels, or for an inpainting UNet the latents, the
    # mask and the masked photo's latents (4 + 1 + 4 = 9 on SDXL).
    unet_in_channels: int = 4
    vae_scale_factor: int = 8
    text_hidden_size: int = 768
    text_hidden_size_2: int = 1280
    pooled_dim: int = 1280
    max_tokens: int = 77
    num_time_ids: int = 6
    image_channels: int = 3
    # Halvings of the latent inside the UNet (down blocks but the last): SDXL's 3 blocks give 2.
    unet_downsamples: int = 2

    @property
    def inpainting(self) -> bool:
        """True when the UNet takes the mask and the masked photo's latents beside the
        latents (diffusers' inpainting UNets)."""
        return self.unet_in_channels == 2 * self.latent_channels + 1

    @property
    def context_dim(self) -> int:
        """Width of the UNet's cross-attention context: both encoders' hidden states."""
        return self.text_hidden_size + self.text_hidden_size_2

    @property
    def graph_size_multiple(self) -> int:
        """Pixels an exported UNet graph's sizes must divide by.

        Eager diffusers resizes its upsampled features to match odd skip connections, but
        an exported graph fixes those shapes, so every downsampling must divide the latent
        exactly: SDXL's 2 halvings times its VAE factor 8 make 32.
        """
        return self.vae_scale_factor * 2**self.unet_downsamples


@dataclass(frozen=True)
class ShapeRequest:
    """Concrete sizes for one call: rows in the batch and the image size in pixels."""

    batch: int
    height: int
    width: int


@dataclass(frozen=True)
class ShapeRange:
    """Minimum, optimum and maximum of batch and image size, for an optimization profile."""

    min: ShapeRequest
    opt: ShapeRequest
    max: ShapeRequest


# Per-row LoRA inputs of a UNet built with LoRA support (see kiln_server.lora.graph).
LORA_SLOTS_INPUT = "lora_slots"
LORA_SCALES_INPUT = "lora_scales"
LORA_DOWN_PREFIX = "lora_down."
LORA_UP_PREFIX = "lora_up."


@dataclass(frozen=True)
class LoraLayerSpec:
    """One UNet layer a LoRA may target: its module name (diffusers'), the shape of one
    rank row of its LoRA down weight ((in,) for a Linear, (in, kh, kw) for a Conv2d) and
    its output features or channels."""

    name: str
    down: tuple[int, ...]
    out: int


@dataclass(frozen=True)
class LoraInputs:
    """What a UNet graph built with per-row LoRA support takes besides its usual inputs.

    `slots` adapters of rank up to `max_rank` (the server settings `lora_slots` and
    `max_lora_rank` it was built for), `max_loras` (adapter, scale) pairs per row (the
    setting `max_loras_per_request`), and per layer of `layers` a down stack
    [slots + 1, max_rank, *down] and an up stack [slots + 1, out, max_rank] (slot 0 is all
    zero: no LoRA). Every size but the rows is fixed at build time.
    """

    slots: int
    max_rank: int
    max_loras: int
    layers: tuple[LoraLayerSpec, ...]

    def tensors(self) -> tuple[TensorSpec, ...]:
        """The graph inputs, in call order: per-row slots and scales, then each layer's
        down and up stacks."""
        stacked = self.slots + 1
        specs = [
            TensorSpec(LORA_SLOTS_INPUT, "int64", ("batch", self.max_loras)),
            TensorSpec(LORA_SCALES_INPUT, "float32", ("batch", self.max_loras)),
        ]
        for layer in self.layers:
            specs.append(
                TensorSpec(
                    LORA_DOWN_PREFIX + layer.name, "float32", (stacked, self.max_rank, *layer.down)
                )
            )
            specs.append(
                TensorSpec(
                    LORA_UP_PREFIX + layer.name, "float32", (stacked, layer.out, self.max_rank)
                )
            )
        return tuple(specs)


@dataclass(frozen=True)
class ComponentSpec:
    """Declaration of one component: name, inputs and outputs in call order.

    `image_sized` says whether the component's shapes depend on the image size (the text
    encoders' do not, so their profiles vary only the batch). `lora` is set on a UNet built
    with per-row LoRA inputs (its inputs then end with `lora.tensors()`).
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: ModelDims
    image_sized: bool = True
    lora: LoraInputs | None = None
    # Token ids an `input_ids` input takes are below this (None: CLIP's vocabulary).
    vocab_size: int | None = None

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        """Inputs then outputs."""
        return self.inputs + self.outputs

    def tensor(self, name: str) -> TensorSpec:
        """The input or output called `name` (KeyError when there is none)."""
        for spec in self.tensors:
            if spec.name == name:
                return spec
        raise KeyError(f"{self.name} has no tensor named {name!r}")

    def dim_values(self, request: ShapeRequest) -> dict[str, int]:
        """Values of every symbolic dim for a concrete call."""
        scale = self.dims.vae_scale_factor
        return {
            "batch": request.batch,
            "image_height": request.height,
            "image_width": request.width,
            "latent_height": request.height // scale,
            "latent_width": request.width // scale,
        }

    def request_for(self, batch: int, values: Mapping[str, int]) -> ShapeRequest:
        """The call of `batch` rows whose symbolic dims take `values` (solved from a call's
        input shapes): the image size from `image_*` or `latent_*` dims, 0 for components
        whose shapes do not depend on the image."""
        scale = self.dims.vae_scale_factor
        height = values.get("image_height", values.get("latent_height", 0) * scale)
        width = values.get("image_width", values.get("latent_width", 0) * scale)
        return ShapeRequest(batch=batch, height=height, width=width)

    def describe_call(self, request: ShapeRequest) -> str:
        """A call's size for messages, e.g. 'batch 2 at 1024x768' ('batch 2' when the
        component's shapes do not depend on the image)."""
        if not self.image_sized:
            return f"batch {request.batch}"
        return f"batch {request.batch} at {request.width}x{request.height}"

    def shape(self, name: str, request: ShapeRequest) -> tuple[int, ...]:
        """Concrete shape of tensor `name` for a call."""
        values = self.dim_values(request)
        return tuple(d if isinstance(d, int) else values[d] for d in self.tensor(name).dims)

    def shapes(self, request: ShapeRequest) -> dict[str, tuple[int, ...]]:
        """Concrete shapes of every input and output for a call."""
        return {spec.name: self.shape(spec.name, request) for spec in self.tensors}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """ONNX dynamic axes: for each tensor, the positions of its symbolic dims."""
        return {
            spec.name: {i: d for i, d in enumerate(spec.dims) if isinstance(d, str)}
            for spec in self.tensors
        }

    def profile(self, shape_range: ShapeRange) -> dict[str, tuple[tuple[int, ...], ...]]:
        """Optimization profile: (min, opt, max) shape of every input."""
        return {
            spec.name: (
                self.shape(spec.name, shape_range.min),
                self.shape(spec.name, shape_range.opt),
                self.shape(spec.name, shape_range.max),
            )
            for spec in self.inputs
        }

    def check_inputs(self, inputs: Mapping[str, object]) -> None:
        """Raise ValueError unless `inputs` names exactly this component's inputs."""
        expected = {spec.name for spec in self.inputs}
        if set(inputs) != expected:
            raise ValueError(f"{self.name} takes inputs {sorted(expected)}, got {sorted(inputs)}")


def text_encoder_spec(dims: ModelDims) -> ComponentSpec:
    """First CLIP text encoder: token ids to its penultimate hidden states."""
    return ComponentSpec(
        name="text_encoder",
        inputs=(TensorSpec("input_ids", "int32", ("batch", dims.max_tokens)),),
        outputs=(
            TensorSpec(
                "hidden_states", "float32", ("batch", dims.max_tokens, dims.text_hidden_size)
            ),
        ),
        dims=dims,
        image_sized=False,
    )


def text_encoder_2_spec(dims: ModelDims) -> ComponentSpec:
    """Second CLIP text encoder: penultimate hidden states and the projected pooled output."""
    return ComponentSpec(
        name="text_encoder_2",
        inputs=(TensorSpec("input_ids", "int32", ("batch", dims.max_tokens)),),
        outputs=(
            TensorSpec(
                "hidden_states", "float32", ("batch", dims.max_tokens, dims.text_hidden_size_2)
            ),
            TensorSpec("text_embeds", "float32", ("batch", dims.pooled_dim)),
        ),
        dims=dims,
        image_sized=False,
    )


def unet_spec(dims: ModelDims, lora: LoraInputs | None = None) -> ComponentSpec:
    """SDXL UNet: one noise prediction per row, each row with its own timestep. An
    inpainting UNet's sample also carries the mask and the masked photo's latents. With
    `lora`, the graph also takes each row's adapters and the adapter stacks."""
    latent = ("batch", dims.latent_channels, "latent_height", "latent_width")
    sample = ("batch", dims.unet_in_channels, "latent_height", "latent_width")
    return ComponentSpec(
        name="unet",
        inputs=(
            TensorSpec("sample", "float32", sample),
            # Per-row timesteps let one call advance requests that are at different steps.
            TensorSpec("timestep", "float32", ("batch",)),
            TensorSpec(
                "encoder_hidden_states", "float32", ("batch", dims.max_tokens, dims.context_dim)
            ),
            TensorSpec("text_embeds", "float32", ("batch", dims.pooled_dim)),
            TensorSpec("time_ids", "float32", ("batch", dims.num_time_ids)),
            *(lora.tensors() if lora is not None else ()),
        ),
        outputs=(TensorSpec("noise_pred", "float32", latent),),
        dims=dims,
        lora=lora,
    )


def _latent_to_image(name: str, dims: ModelDims) -> ComponentSpec:
    return ComponentSpec(
        name=name,
        inputs=(
            TensorSpec(
                "latent",
                "float32",
                ("batch", dims.latent_channels, "latent_height", "latent_width"),
            ),
        ),
        outputs=(
            TensorSpec(
                "images", "float32", ("batch", dims.image_channels, "image_height", "image_width")
            ),
        ),
        dims=dims,
    )


def vae_decoder_spec(dims: ModelDims) -> ComponentSpec:
    """VAE decoder: latents (already divided by the scaling factor) to images in [-1, 1]."""
    return _latent_to_image("vae_decoder", dims)


def vae_encoder_spec(dims: ModelDims) -> ComponentSpec:
    """VAE encoder: images in [-1, 1] to the latent distribution's parameters (unscaled):
    its mean and log-variance stacked on the channel axis, so the pipeline can draw a
    sample from a seeded generator as diffusers does."""
    return ComponentSpec(
        name="vae_encoder",
        inputs=(
            TensorSpec(
                "images", "float32", ("batch", dims.image_channels, "image_height", "image_width")
            ),
        ),
        outputs=(
            TensorSpec(
                "latent_parameters",
                "float32",
                ("batch", 2 * dims.latent_channels, "latent_height", "latent_width"),
            ),
        ),
        dims=dims,
    )


def preview_decoder_spec(dims: ModelDims) -> ComponentSpec:
    """Learned preview decoder (AutoencoderTiny's decoder): the UNet-space latents (scaled
    by the VAE's scaling factor, as the denoising loop holds them) to images in [-1, 1] at
    full image size."""
    return _latent_to_image("preview_decoder", dims)


COMPONENT_NAMES = (
    "text_encoder",
    "text_encoder_2",
    "unet",
    "vae_decoder",
    "vae_encoder",
    "preview_decoder",
)
# Components only some models have: the rest are in every SDXL-family model.
OPTIONAL_COMPONENTS = ("preview_decoder",)


def sdxl_component_specs(
    dims: ModelDims, *, preview_decoder: bool = True, lora: LoraInputs | None = None
) -> dict[str, ComponentSpec]:
    """Every component of an SDXL-family model, keyed by name, in COMPONENT_NAMES order.

    `preview_decoder=False` leaves out the learned preview decoder (a model without one);
    `lora` gives the UNet per-row LoRA inputs.
    """
    specs = {
        "text_encoder": text_encoder_spec(dims),
        "text_encoder_2": text_encoder_2_spec(dims),
        "unet": unet_spec(dims, lora),
        "vae_decoder": vae_decoder_spec(dims),
        "vae_encoder": vae_encoder_spec(dims),
    }
    if preview_decoder:
        specs["preview_decoder"] = preview_decoder_spec(dims)
    return specs
