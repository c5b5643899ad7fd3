"""The torch backend: diffusers modules in eager mode, Kiln's numerical reference."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kiln_server.engines.base import EngineSet
from kiln_server.engines.components import ComponentSpec, sdxl_component_specs
from kiln_server.engines.torch_modules import component_module


class TorchEngine:
    """Runs a component's wrapper module eagerly under torch.inference_mode."""

    def __init__(self, spec: ComponentSpec, module: torch.nn.Module) -> None:
        self.spec = spec
        self.module = module
        self.max_batch: int | None = None  # eager torch takes any batch

    def infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the module on the declared inputs, in declared order."""
        self.spec.check_inputs(inputs)
        with torch.inference_mode():
            result = self.module(*(inputs[spec.name] for spec in self.spec.inputs))
        outputs = result if isinstance(result, tuple) else (result,)
        return {spec.name: out for spec, out in zip(self.spec.outputs, outputs, strict=True)}


def load_torch_engines(modules: Any, dims: Any) -> EngineSet:
    """Wrap loaded SDXLModules as an EngineSet on the torch backend."""
    specs = sdxl_component_specs(dims)
    engines = {
        name: TorchEngine(spec, component_module(spec, modules)) for name, spec in specs.items()
    }
    return EngineSet(backend="torch", **engines)
