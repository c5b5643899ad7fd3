"""What a build needs from a model of either family, read from its folder.

`read_target` tells SDXL from FLUX (kiln_server.models.family) and returns one
`BuildTarget`: the component declarations to export, the default shape graphs are traced
at, the size multiple the graphs need, the folder's identity for the manifest, and how to
get the torch modules export traces (loaded only when the ONNX stage runs: a TensorRT
build that reuses its graphs never loads weights). The build stages read nothing else, so
they are the same for both families.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kiln_server.engines.base import EngineError
from kiln_server.engines.components import (
    ComponentSpec,
    LoraInputs,
    ShapeRequest,
    sdxl_component_specs,
)
from kiln_server.models.family import FLUX, SDXL

if TYPE_CHECKING:
    from torch import nn

    from kiln_server.engines.manifest import LoraRecord


def _no_context(_component: str) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


@dataclass
class BuildTarget:
    """One model as the build stages see it.

    `source` is the file or folder the weights come from (the manifest records it),
    `default` one image at the model's default size, `size_multiple` what every image side
    of the exported graphs must divide by. `modules()` loads the weights and returns the
    torch module per component, ready to trace; `trace_context(name)` is entered around
    tracing `name` (FLUX's transformer traces with a rewritten rotary embedding).
    """

    family: str
    source: Path
    specs: dict[str, ComponentSpec]
    default: ShapeRequest
    size_multiple: int
    modules: Callable[[], dict[str, nn.Module]]
    trace_context: Callable[[str], contextlib.AbstractContextManager[None]] = field(
        default=_no_context
    )


def read_target(
    model_path: Path,
    *,
    preview_decoder: Path | None = None,
    checkpoint: Path | None = None,
    lora: LoraRecord | None = None,
    default_size: tuple[int, int] | None = None,
) -> BuildTarget:
    """The BuildTarget of the model folder `model_path` (`default_size`: (height, width)
    overriding the folder's default). Raises EngineError naming the folder's problem, or
    options its family does not take (LoRA inputs, a checkpoint or a preview decoder for
    a FLUX model)."""
    from kiln_server.models.family import model_family
    from kiln_server.models.loader import ModelFolderError

    try:
        family = model_family(model_path)
        if family == FLUX:
            refused = [
                flag
                for flag, value in (
                    ("--lora-slots / --max-lora-rank / --max-loras-per-request", lora),
                    ("a single-file checkpoint", checkpoint),
                    ("a preview decoder", preview_decoder),
                )
                if value is not None
            ]
            if refused:
                raise EngineError(
                    f"{model_path} is a FLUX model, whose engines take no {refused[0]} yet; "
                    "build it without"
                )
            target = _flux_target(model_path)
        else:
            target = _sdxl_target(model_path, preview_decoder, checkpoint, lora)
    except ModelFolderError as exc:
        raise EngineError(str(exc)) from exc
    if default_size is not None:
        target.default = ShapeRequest(1, *default_size)
    return target


def _sdxl_target(
    model_path: Path,
    preview_decoder: Path | None,
    checkpoint: Path | None,
    lora: LoraRecord | None,
) -> BuildTarget:
    from kiln_server.engines.loading import default_request
    from kiln_server.models.loader import read_model_files

    files = read_model_files(model_path, preview_decoder, checkpoint=checkpoint)
    specs = sdxl_component_specs(
        files.dims,
        # The preview decoder is exported when the model has one, like every other component.
        preview_decoder=files.preview_decoder_path is not None,
        lora=model_lora_inputs(model_path, lora),
    )

    def modules() -> dict[str, nn.Module]:
        from kiln_server.engines.torch_modules import component_module
        from kiln_server.models.loader import load_modules

        loaded = load_modules(
            model_path, preview_decoder=files.preview_decoder_path, checkpoint=files.checkpoint
        )
        torch_modules = {name: component_module(spec, loaded) for name, spec in specs.items()}
        unet_lora = specs["unet"].lora
        if unet_lora is not None:
            from kiln_server.lora.graph import LoraUNetModule

            torch_modules["unet"] = LoraUNetModule(torch_modules["unet"], unet_lora).eval()
        return torch_modules

    return BuildTarget(
        family=SDXL,
        source=files.source,
        specs=specs,
        default=default_request(files),
        size_multiple=files.dims.graph_size_multiple,
        modules=modules,
    )


def _flux_target(model_path: Path) -> BuildTarget:
    from kiln_build.flux_export import flux_export_modules, flux_trace_context
    from kiln_server.engines.flux_components import flux_component_specs
    from kiln_server.models.flux_loader import read_flux_model_files

    files = read_flux_model_files(model_path)
    config = files.kiln_config
    return BuildTarget(
        family=FLUX,
        source=model_path,
        specs=flux_component_specs(files.dims),
        default=ShapeRequest(
            1, int(config.get("default_height", 1024)), int(config.get("default_width", 1024))
        ),
        size_multiple=files.dims.size_multiple,
        modules=lambda: flux_export_modules(model_path, files.dims),
        trace_context=flux_trace_context,
    )


def model_lora_inputs(model_path: Path, record: LoraRecord | None) -> LoraInputs | None:
    """The UNet graph's LoRA inputs for the model folder's UNet and `record` (None: none).

    The layers are those the torch backend's per-row LoRA layers wrap, read from the
    UNet's config (no weights are loaded), so the server derives the same declaration.
    """
    if record is None:
        return None
    from kiln_server.lora.graph import lora_inputs, shape_only_unet, unet_config_of

    unet = shape_only_unet(unet_config_of(model_path))
    return lora_inputs(
        unet.layers, slots=record.slots, max_rank=record.max_rank, max_loras=record.max_loras
    )
