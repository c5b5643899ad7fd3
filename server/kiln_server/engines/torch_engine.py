"""The torch backend: diffusers modules on the CPU or a CUDA GPU, Kiln's numerical reference.

On a GPU the UNet and text encoders run in fp16 (or bf16) with PyTorch's
scaled-dot-product attention (diffusers' default attention processor). SDXL's VAE
overflows in fp16, so it decodes in fp32 when its config asks for that (`force_upcast`, as
diffusers does) unless the model ships an fp16-safe VAE. Optionally the UNet is compiled
(torch.compile) and each UNet call shape is replayed from a captured CUDA graph; both are
paid for during warm-up.

Per-request LoRAs (kiln_server.lora) are installed on the UNet and both text encoders as
per-row layers, one adapter stack over all three. A UNet
call where some row applies a LoRA runs the uncompiled module eagerly: a captured CUDA
graph holds the base layers only, and a compiled module would recompile for every
assignment. Calls without a LoRA row keep the fast path.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kiln_server.engines.base import EngineError, EngineSet
from kiln_server.engines.components import ComponentSpec, ModelDims, sdxl_component_specs
from kiln_server.engines.device import Placement
from kiln_server.engines.torch_modules import component_module
from kiln_server.lora.folders import LoraFolders
from kiln_server.lora.layers import RowLoraLayers, install_row_lora
from kiln_server.lora.library import LoraLibrary
from kiln_server.lora.reading import TEXT_MODEL_PREFIX
from kiln_server.lora.stack import AdapterStack

log = logging.getLogger(__name__)

Shapes = tuple[tuple[int, ...], ...]
# Images per VAE call on a GPU: an fp32 SDXL decode at 1024x1024 peaks at several GB per
# image, so a whole 8-image request at once could run out of memory after all its steps.
CUDA_VAE_IMAGES_PER_CALL = 1
# Inputs that stay float32 whatever the compute dtype: diffusers builds the timestep
# embedding in fp32, and SDXL's timesteps (e.g. 967) are not exact in bf16 (968).
FULL_PRECISION_INPUTS = frozenset({"timestep"})


@dataclass
class _CapturedCall:
    """One call shape recorded as a CUDA graph: its static inputs and outputs."""

    graph: Any
    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]


class TorchEngine:
    """Runs a component's wrapper module under torch.inference_mode on one device.

    Inputs are moved to the engine's device and floating inputs cast to its compute dtype;
    outputs come back as the declared dtype (float32), owned by the caller.
    """

    def __init__(
        self,
        spec: ComponentSpec,
        module: torch.nn.Module,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        cuda_graphs: bool = False,
        graph_pool: Any = None,
        max_batch: int | None = None,
        channels_last: bool = False,
        eager_module: torch.nn.Module | None = None,
    ) -> None:
        self.spec = spec
        self.module = module
        # The module before torch.compile: what runs a call with LoRA rows.
        self.eager_module = eager_module if eager_module is not None else module
        # The per-row LoRA layers installed inside the module, if any.
        self.row_lora: RowLoraLayers | None = None
        self.device = device or torch.device("cpu")
        self.dtype = dtype
        # Eager torch takes any batch; a limit here is what the pipeline chunks calls by.
        self.max_batch = max_batch
        # 4-D inputs in NHWC, for a module whose weights were moved to channels_last.
        self.channels_last = channels_last
        if cuda_graphs and self.device.type != "cuda":
            raise EngineError(f"CUDA graphs for {spec.name} need a CUDA device, not {self.device}")
        self.cuda_graphs = cuda_graphs
        self._graph_pool = graph_pool
        self._graphs: dict[Shapes, _CapturedCall] = {}
        self._sealed = False

    def seal(self) -> None:
        """Capture no new CUDA graphs: call shapes without one run eagerly from now on.

        Called after warm-up. Capturing while serving would stall the running batch (a
        capture synchronizes the device and empties the allocator's cache) for a shape
        the warm-up did not foresee, such as a size other than the default.
        """
        self._sealed = True

    def _prepare(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        values = []
        for tensor_spec in self.spec.inputs:
            value = inputs[tensor_spec.name]
            cast = value.is_floating_point() and tensor_spec.name not in FULL_PRECISION_INPUTS
            dtype = self.dtype if cast else value.dtype
            value = value.to(device=self.device, dtype=dtype, non_blocking=True)
            if self.channels_last and value.dim() == 4:
                value = value.contiguous(memory_format=torch.channels_last)
            values.append(value)
        return tuple(values)

    def _outputs(self, result: Any, *, copy: bool) -> dict[str, torch.Tensor]:
        outputs = result if isinstance(result, tuple) else (result,)
        owned = {}
        for spec, out in zip(self.spec.outputs, outputs, strict=True):
            target = getattr(torch, spec.dtype)
            # `.to` returns the same tensor when nothing changes; a replayed graph's
            # outputs are its static buffers, so those are copied.
            converted = out.to(dtype=target)
            owned[spec.name] = converted.clone() if copy and converted is out else converted
        return owned

    def _capture(self, args: tuple[torch.Tensor, ...]) -> _CapturedCall:
        """Record one call shape: a plain run on a side stream first, as capture requires."""
        static_inputs = tuple(a.clone() for a in args)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.module(*static_inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # The capture stream must be on the engine's device (the default one is created
        # on the current device); thread_local keeps other threads' CUDA calls legal.
        capture = torch.cuda.Stream(device=self.device)
        with torch.cuda.graph(
            graph, pool=self._graph_pool, stream=capture, capture_error_mode="thread_local"
        ):
            result = self.module(*static_inputs)
        outputs = result if isinstance(result, tuple) else (result,)
        log.info(
            "captured a CUDA graph",
            extra={"component": self.spec.name, "shapes": [list(a.shape) for a in args]},
        )
        return _CapturedCall(graph, static_inputs, tuple(outputs))

    def infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the module on the declared inputs, in declared order."""
        self.spec.check_inputs(inputs)
        with torch.inference_mode():
            args = self._prepare(inputs)
            assignment = self.row_lora.assignment if self.row_lora is not None else None
            if assignment is not None and assignment.any_active:
                return self._outputs(self.eager_module(*args), copy=False)
            if not self.cuda_graphs:
                return self._outputs(self.module(*args), copy=False)
            key = tuple(tuple(a.shape) for a in args)
            call = self._graphs.get(key)
            if call is None:
                if self._sealed:
                    return self._outputs(self.module(*args), copy=False)
                call = self._graphs[key] = self._capture(args)
            for static, value in zip(call.inputs, args, strict=True):
                static.copy_(value, non_blocking=True)
            call.graph.replay()
            return self._outputs(call.outputs, copy=True)


def vae_dtype(dtype: torch.dtype, force_upcast: bool) -> torch.dtype:
    """The VAE's precision: fp32 when SDXL's VAE would overflow in fp16 (as diffusers)."""
    return torch.float32 if dtype == torch.float16 and force_upcast else dtype


def load_torch_engines(
    modules: Any, dims: ModelDims, placement: Placement | None = None, *, vae_upcast: bool = True
) -> EngineSet:
    """Wrap loaded SDXLModules as an EngineSet on the torch backend, moved to `placement`.

    `vae_upcast` is the VAE config's `force_upcast`: with fp16 the VAE then stays fp32.
    With `placement.compile` the UNet is wrapped in torch.compile (compiled on its first
    calls, i.e. during warm-up); with `placement.cuda_graphs` each UNet call shape is
    captured on its first call and replayed after. A preview decoder in `modules` becomes
    the set's `preview_decoder` engine, in the compute dtype.
    """
    placement = placement or Placement(torch.device("cpu"), torch.float32)
    device, dtype = placement.device, placement.dtype
    vae_precision = vae_dtype(dtype, vae_upcast)
    preview_decoder = getattr(modules, "preview_decoder", None)
    networks: list[tuple[Any, torch.dtype]] = [
        (modules.unet, dtype),
        (modules.text_encoder, dtype),
        (modules.text_encoder_2, dtype),
        (modules.vae, vae_precision),
    ]
    if preview_decoder is not None:
        # TAESD-style decoders are fp16-safe (taesdxl is published for fp16 use).
        networks.append((preview_decoder, dtype))
    for module, precision in networks:
        # Cast only when needed: load_modules already loads in the right precision, and
        # diffusers warns on every `.to(dtype)`.
        if module.dtype != precision:
            module.to(dtype=precision)
        module.to(device=device)
    specs = sdxl_component_specs(dims, preview_decoder=preview_decoder is not None)
    pool = torch.cuda.graph_pool_handle() if placement.cuda_graphs else None
    engines: dict[str, TorchEngine] = {}
    for name, spec in specs.items():
        module = eager = component_module(spec, modules)
        is_unet = name == "unet"
        if is_unet and placement.compile:
            module = torch.compile(module)
        # The preview decoder is a stack of small convolutions: in NHWC they run about 25%
        # faster on a CPU (the layout tensor cores prefer on a GPU too).
        channels_last = name == "preview_decoder"
        if channels_last:
            module.to(memory_format=torch.channels_last)
        engines[name] = TorchEngine(
            spec,
            module,
            device=device,
            dtype=vae_precision if name.startswith("vae") else dtype,
            cuda_graphs=is_unet and placement.cuda_graphs,
            graph_pool=pool,
            max_batch=(
                CUDA_VAE_IMAGES_PER_CALL
                if name.startswith("vae") and device.type == "cuda"
                else None
            ),
            channels_last=channels_last,
            eager_module=eager,
        )
    description = placement.describe()
    if vae_precision != dtype:
        description += ", VAE fp32 (force_upcast)"
    return EngineSet(
        backend="torch",
        text_encoder=engines["text_encoder"],
        text_encoder_2=engines["text_encoder_2"],
        unet=engines["unet"],
        vae_decoder=engines["vae_decoder"],
        vae_encoder=engines["vae_encoder"],
        preview_decoder=engines.get("preview_decoder"),
        device=device,
        placement=description,
    )


def torch_lora_library(
    engines: EngineSet, folders: LoraFolders, *, slots: int, max_rank: int
) -> LoraLibrary:
    """Install per-row LoRA layers on the torch UNet and text encoders of `engines`
    (weights already loaded) and return the library serving LoRAs from `folders` with
    `slots` adapters of rank up to `max_rank`. Installing changes the modules, so it comes
    before warm-up."""
    targets = {
        "unet": (engines.unet, "unet"),
        "text_encoder": (engines.text_encoder, "encoder"),
        "text_encoder_2": (engines.text_encoder_2, "encoder"),
    }
    models = {}
    for name, (engine, attribute) in targets.items():
        if not isinstance(engine, TorchEngine) or engine.row_lora is not None:
            raise EngineError(f"per-row LoRAs install once, on a torch {name} engine")
        model = getattr(engine.eager_module, attribute, None)
        if model is None:
            raise EngineError(f"the torch {name} engine does not wrap a loaded model")
        models[name] = (engine, model)
    layers = {}
    for name, (engine, model) in models.items():
        # Text-encoder modules are named as LoRA files read them (lora.reading), without
        # the `text_model.` level that older transformers' CLIP models have.
        drop = "" if name == "unet" else TEXT_MODEL_PREFIX
        engine.row_lora = layers[name] = install_row_lora(model, drop_prefix=drop)
    stack = AdapterStack(
        layers.pop("unet"), capacity=slots, max_rank=max_rank, text_encoders=layers
    )
    return LoraLibrary(folders, stack, unet_config=models["unet"][1].config)
