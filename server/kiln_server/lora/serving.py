"""Making a loaded engine set serve per-request LoRAs, whatever its backend.

torch installs per-row layers on its UNet (`torch_lora_library`). onnxruntime and TensorRT
UNet graphs built with LoRA inputs get an adapter stack over their weightless per-row
layers, whose tensors the graph's feed binds (graph_feed.py); the server's LoRA settings
must be those the graphs were built for. Graphs built without LoRA inputs serve no LoRAs:
requests naming one are refused with the command that rebuilds them with LoRA support.
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass

from kiln_server.engines.base import EngineError, EngineSet
from kiln_server.engines.manifest import LoraRecord
from kiln_server.lora.folders import LoraFolders
from kiln_server.lora.graph_feed import CompiledLora
from kiln_server.lora.library import LoraLibrary
from kiln_server.lora.stack import AdapterStack

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraSettings:
    """The server settings LoRAs are served with: `lora_slots`, `max_lora_rank`,
    `max_loras_per_request`."""

    slots: int
    max_rank: int
    max_loras: int

    def as_record(self) -> LoraRecord:
        """The build record engines serving these settings carry."""
        return LoraRecord(self.slots, self.max_rank, self.max_loras)


def _rebuild(lora: CompiledLora, settings: LoraSettings) -> str:
    return f"{lora.rebuild} {shlex.join(settings.as_record().as_args())}"


def settings_mismatches(built: LoraRecord, settings: LoraSettings) -> list[str]:
    """Each server setting the engines' LoRA inputs cannot serve, as a phrase naming it.

    Slots and rank fix the stacks' shapes, so they must be equal; the graph takes up to its
    built number of LoRAs per row, so the server's `max_loras_per_request` may be lower.
    """
    problems = []
    if built.slots != settings.slots:
        problems.append(
            f"lora_slots is {settings.slots} but the engines were built with --lora-slots "
            f"{built.slots}"
        )
    if built.max_rank != settings.max_rank:
        problems.append(
            f"max_lora_rank is {settings.max_rank} but the engines were built with "
            f"--max-lora-rank {built.max_rank}"
        )
    if settings.max_loras > built.max_loras:
        problems.append(
            f"max_loras_per_request is {settings.max_loras} but the engines take at most "
            f"{built.max_loras} (--max-loras-per-request)"
        )
    return problems


def compiled_lora_library(
    lora: CompiledLora, folders: LoraFolders, settings: LoraSettings
) -> LoraLibrary | None:
    """The library feeding a compiled UNet's LoRA inputs, or None (with `lora.refusal` set)
    when its graph has none. Raises EngineError naming each differing setting and the
    rebuild command when the graph was built for other LoRA settings."""
    feed = lora.feed
    if feed is None:
        lora.refusal = (
            f"loras: this model's {lora.backend} engines were built without LoRA inputs; "
            f"rebuild them with LoRA support: {_rebuild(lora, settings)}"
        )
        return None
    built = feed.lora
    problems = settings_mismatches(
        LoraRecord(built.slots, built.max_rank, built.max_loras), settings
    )
    if problems:
        raise EngineError(
            f"the {lora.backend} UNet's LoRA inputs do not fit the server's settings: "
            f"{'; '.join(problems)}. Rebuild the engines for these settings with: "
            f"{_rebuild(lora, settings)} (or set the server's settings to the engines')"
        )
    stack = AdapterStack(feed.layers, capacity=built.slots, max_rank=built.max_rank)
    return LoraLibrary(folders, stack, unet_config=lora.unet_config)


def engine_lora_library(
    engines: EngineSet, folders: LoraFolders, settings: LoraSettings
) -> LoraLibrary | None:
    """The library serving LoRAs from `folders` on `engines`, or None when the engines
    apply none (their refusal says why). Comes before warm-up."""
    if engines.backend == "torch":
        from kiln_server.engines.torch_engine import torch_lora_library

        return torch_lora_library(
            engines, folders, slots=settings.slots, max_rank=settings.max_rank
        )
    lora = getattr(engines.unet, "lora", None)
    if not isinstance(lora, CompiledLora):
        raise EngineError(f"the {engines.backend} UNet engine has no LoRA wiring")
    return compiled_lora_library(lora, folders, settings)
