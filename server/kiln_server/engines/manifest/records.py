"""What an engines directory's manifest records: the model, the graphs, the TensorRT builds
per machine and the LoRA inputs, as dataclasses; and how two machines differ."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kiln_server.engines.components import ShapeRange
from kiln_server.engines.engine_numerics import NumericsRecord

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class TensorEntry:
    """A tensor of a built graph as recorded: name, dtype and declared dims."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]


@dataclass(frozen=True)
class MachineInfo:
    """What a TensorRT engine is tied to: GPU model, compute capability, library versions."""

    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    cuda_version: str

    def describe(self) -> str:
        """One line naming every field, for messages."""
        return (
            f"{self.gpu_name}, compute capability {self.compute_capability}, "
            f"TensorRT {self.tensorrt_version}, CUDA {self.cuda_version}"
        )


@dataclass(frozen=True)
class ModelRecord:
    """The model the engines were built from: registry name (if any), folder, content hash."""

    name: str | None
    path: str
    content_hash: str


@dataclass
class OnnxComponent:
    """One exported ONNX graph."""

    name: str
    file: str
    sha256: str
    size_bytes: int
    opset: int
    model_content_hash: str
    inputs: tuple[TensorEntry, ...]
    outputs: tuple[TensorEntry, ...]
    # Shapes the graph was checked against torch at, with the worst relative error seen.
    validated: list[dict[str, Any]] = field(default_factory=list)
    # Weights of graphs over 2 GB live in one file beside the graph.
    external_data: str | None = None
    external_data_bytes: int = 0


@dataclass
class TensorRTComponent:
    """One serialized TensorRT engine."""

    name: str
    file: str
    sha256: str
    size_bytes: int
    model_content_hash: str
    onnx_sha256: str
    precision: str
    refittable: bool
    inputs: tuple[TensorEntry, ...]
    outputs: tuple[TensorEntry, ...]
    profiles: tuple[ShapeRange, ...]
    # The engine compared with onnxruntime after the build; None when the check was skipped.
    numerics: NumericsRecord | None = None


@dataclass
class TensorRTBuild:
    """The engines built on one kind of machine."""

    machine: MachineInfo
    components: dict[str, TensorRTComponent]
    timing_cache: str | None = None


@dataclass(frozen=True)
class LoraRecord:
    """The per-row LoRA inputs the UNet graph was built with (`kiln build-engines
    --lora-slots N --max-lora-rank R --max-loras-per-request K`): the server settings
    `lora_slots`, `max_lora_rank` and `max_loras_per_request` it serves LoRAs with."""

    slots: int
    max_rank: int
    max_loras: int

    def as_args(self) -> list[str]:
        """The `kiln build-engines` flags that build these inputs."""
        return [
            "--lora-slots",
            str(self.slots),
            "--max-lora-rank",
            str(self.max_rank),
            "--max-loras-per-request",
            str(self.max_loras),
        ]


@dataclass
class Manifest:
    """Everything `build-engines` wrote into one engines directory."""

    model: ModelRecord
    onnx: dict[str, OnnxComponent] = field(default_factory=dict)
    tensorrt: list[TensorRTBuild] = field(default_factory=list)
    # Extra `build-engines` flags the engines were built with (profiles), for rebuild hints.
    build_args: list[str] = field(default_factory=list)
    # The `--config` file that defined the model's name, when one was used.
    config: str | None = None
    # The UNet graph's per-row LoRA inputs; None: built without LoRA support.
    lora: LoraRecord | None = None
    version: int = MANIFEST_VERSION

    def tensorrt_build_for(self, machine: MachineInfo) -> TensorRTBuild | None:
        """The TensorRT build made on a machine identical to `machine`, if any."""
        for build in self.tensorrt:
            if not machine_mismatches(build.machine, machine):
                return build
        return None

    def replace_tensorrt_build(self, build: TensorRTBuild) -> None:
        """Add `build`, replacing an earlier build for the same machine."""
        self.tensorrt = [b for b in self.tensorrt if b.machine != build.machine] + [build]


def tensor_entries(tensors: Iterable[Any]) -> tuple[TensorEntry, ...]:
    """TensorEntry records for declared TensorSpecs."""
    return tuple(TensorEntry(t.name, t.dtype, tuple(t.dims)) for t in tensors)


def cuda_major(version: str) -> str:
    """Major CUDA version of a version string ("12.4" -> "12")."""
    return version.split(".", 1)[0]


def machine_mismatches(built: MachineInfo, here: MachineInfo) -> list[str]:
    """Each value that differs between the build machine and this one, as a phrase.

    GPU name, compute capability and the exact TensorRT version must match; CUDA must match
    in its major version (TensorRT engines are tied to the CUDA major release).
    """
    problems = []
    if built.gpu_name != here.gpu_name:
        problems.append(f"GPU {built.gpu_name!r} (this machine has {here.gpu_name!r})")
    if built.compute_capability != here.compute_capability:
        problems.append(
            f"compute capability {built.compute_capability} "
            f"(this machine has {here.compute_capability})"
        )
    if built.tensorrt_version != here.tensorrt_version:
        problems.append(
            f"TensorRT version {built.tensorrt_version} (this machine has {here.tensorrt_version})"
        )
    if cuda_major(built.cuda_version) != cuda_major(here.cuda_version):
        problems.append(f"CUDA version {built.cuda_version} (this machine has {here.cuda_version})")
    return problems
