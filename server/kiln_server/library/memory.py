"""How many bytes a loaded model holds on its device.

On a GPU the honest number is what the device lost: free memory before and after loading
(`DeviceMemory`), which counts torch's, onnxruntime's and TensorRT's allocations alike,
including workspaces the warm-up left allocated. On the CPU, where other processes and the
allocator make RSS deltas noise, the bytes are counted from what the engines hold: torch
modules' parameters and buffers (each storage once), and for graph engines their files on
disk, which their sessions hold in memory.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import torch

from kiln_server.engines.base import EngineSet
from kiln_server.engines.flux_engines import FluxEngineSet


def _module_bytes(module: torch.nn.Module, seen: set[int]) -> int:
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _file_bytes(path: Path) -> int:
    """An ONNX file and its external-data files (named after it, in its folder)."""
    if not path.is_file():
        return 0
    return sum(p.stat().st_size for p in path.parent.glob(f"{path.name}*") if p.is_file())


def engine_bytes(engine: Any, seen: set[int]) -> int:
    """Bytes one engine holds: a torch engine's module storages, a graph engine's files,
    a TensorRT engine's declared device memory (0 for what it cannot tell)."""
    module = getattr(engine, "eager_module", None) or getattr(engine, "module", None)
    if isinstance(module, torch.nn.Module):
        return _module_bytes(module, seen)
    path = getattr(engine, "path", None)
    if isinstance(path, Path):
        return _file_bytes(path)
    return int(getattr(engine, "device_memory_size", 0) or 0)


# The engine fields of either family's engine set (SDXL's UNet, FLUX's transformer).
_ENGINE_FIELDS = (
    "text_encoder",
    "text_encoder_2",
    "unet",
    "transformer",
    "vae_decoder",
    "vae_encoder",
    "preview_decoder",
)


def engine_set_bytes(engines: EngineSet | FluxEngineSet) -> int:
    """Bytes every engine of the set holds, storages shared between engines counted once."""
    seen: set[int] = set()
    parts = [getattr(engines, name, None) for name in _ENGINE_FIELDS]
    return sum(engine_bytes(engine, seen) for engine in parts if engine is not None)


class DeviceMemory:
    """Free bytes of a CUDA device, before and after a load (CPU: not measured)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.before = self._free()

    def _free(self) -> int | None:
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.mem_get_info(self.device)[0])

    def taken(self) -> int | None:
        """Bytes the device lost since this was made (None on the CPU)."""
        after = self._free()
        if self.before is None or after is None:
            return None
        return max(self.before - after, 0)


def release_memory(device: torch.device) -> None:
    """Return an unloaded model's memory: collect its objects, and on a GPU give torch's
    cached blocks back to the device so the next model (or another process) can use them."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
