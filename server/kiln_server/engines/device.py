"""Which device and precision the engines run on, resolved once at start-up.

`kiln serve --device` and `--dtype` (also KILN_DEVICE, KILN_DTYPE and the config file)
name them; unset, the device is the first CUDA GPU torch sees, else the CPU, and the
precision is fp16 on a GPU (what SDXL's weights are published in; FLUX models get bf16,
see `Placement.for_family`) and fp32 on the CPU (where fp16 kernels are slow or
missing). Everything that cannot run here fails with a message naming the flag and the
fix, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kiln_server.engines.base import EngineError

DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
}


def dtype_name(dtype: torch.dtype) -> str:
    """The flag spelling of a torch dtype (fp16, bf16, fp32)."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"{dtype} is not a compute dtype Kiln serves in")


def cuda_available() -> bool:
    """Whether torch can run on a CUDA GPU here (a CUDA build and a visible device)."""
    return bool(torch.backends.cuda.is_built() and torch.cuda.is_available())


def resolve_device(requested: str | None) -> torch.device:
    """The device to serve on: `requested` checked, or cuda when a GPU is visible, else cpu.

    Raises EngineError naming the problem when `requested` is not cpu, cuda or cuda:N, or
    names a GPU this machine does not have.
    """
    if requested is None or requested == "":
        return torch.device("cuda", 0) if cuda_available() else torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as exc:
        raise EngineError(
            f"--device {requested!r} is not a device; use cpu, cuda or cuda:N"
        ) from exc
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise EngineError(f"--device {requested!r}: Kiln serves on cpu or cuda[:N]")
    if not torch.backends.cuda.is_built():
        raise EngineError(
            f"--device {requested}: this torch {torch.__version__} is a CPU-only build; "
            "install a CUDA build of torch on the GPU host, or serve with --device cpu"
        )
    if not torch.cuda.is_available():
        raise EngineError(
            f"--device {requested}: torch sees no CUDA GPU (no device or driver); check "
            "nvidia-smi and CUDA_VISIBLE_DEVICES, or serve with --device cpu"
        )
    index = 0 if device.index is None else device.index
    count = torch.cuda.device_count()
    if index >= count:
        raise EngineError(
            f"--device {requested}: this machine has {count} CUDA device(s), "
            f"cuda:0 to cuda:{count - 1}"
        )
    return torch.device("cuda", index)


def resolve_dtype(requested: str | None, device: torch.device) -> torch.dtype:
    """The compute precision: `requested` (fp16, bf16, fp32), else fp16 on CUDA, fp32 on CPU.

    Raises EngineError for an unknown name, for fp16 on the CPU (half-precision CPU kernels
    are missing or far slower than fp32), and for bf16 on a GPU without bf16 support.
    """
    if requested is None or requested == "":
        return torch.float16 if device.type == "cuda" else torch.float32
    if requested not in DTYPES:
        raise EngineError(f"--dtype {requested!r}: choose one of {', '.join(DTYPES)}")
    dtype = DTYPES[requested]
    if device.type == "cpu" and dtype == torch.float16:
        raise EngineError(
            "--dtype fp16 needs a GPU: the CPU lacks fast half-precision kernels; use fp32 "
            "(the CPU default) or bf16"
        )
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise EngineError(
            f"--dtype bf16: {torch.cuda.get_device_name(device)} lacks bf16; use fp16"
        )
    return dtype


@dataclass(frozen=True)
class Placement:
    """Where and how a model's torch modules run: device, precision and compilation.

    `compile` wraps the UNet in torch.compile; `cuda_graphs` replays each UNet call shape
    from a captured CUDA graph (GPU only). Both are warmed up before the server reports
    SERVING.
    """

    device: torch.device
    dtype: torch.dtype
    compile: bool = False
    cuda_graphs: bool = False
    # Whether `dtype` was asked for (--dtype), rather than the device's default.
    dtype_requested: bool = False

    @classmethod
    def resolve(
        cls,
        device: str | None,
        dtype: str | None,
        *,
        compile: bool = False,
        cuda_graphs: bool = False,
    ) -> Placement:
        """Check the settings together; EngineError names any that cannot run here."""
        resolved = resolve_device(device)
        if cuda_graphs and resolved.type != "cuda":
            raise EngineError(
                "--cuda-graphs needs a GPU: CUDA graphs replay GPU work; drop the flag or "
                "serve with --device cuda"
            )
        dtype_requested = bool(dtype)
        return cls(resolved, resolve_dtype(dtype, resolved), compile, cuda_graphs, dtype_requested)

    def for_family(self, family: str) -> Placement:
        """This placement for a model of `family`. FLUX on a GPU gets bf16 (fp32 where the
        GPU lacks bf16) instead of the fp16 default: FLUX's activations overflow fp16's
        range and give NaN (black) images, which is why FLUX.1 ships in bf16. A --dtype
        asked for explicitly is kept."""
        if (
            family != "flux"
            or self.dtype_requested
            or self.device.type != "cuda"
            or self.dtype != torch.float16
        ):
            return self
        # Native bf16 needs compute capability 8 (Ampere); older GPUs only emulate it, slowly.
        native = torch.cuda.get_device_capability(self.device)[0] >= 8
        return replace(self, dtype=torch.bfloat16 if native else torch.float32)

    def describe(self) -> str:
        """E.g. 'cuda:0 fp16, compiled, CUDA graphs' for logs and ListModels."""
        parts = [f"{self.device} {dtype_name(self.dtype)}"]
        if self.compile:
            parts.append("compiled")
        if self.cuda_graphs:
            parts.append("CUDA graphs")
        return ", ".join(parts)


def bind_thread(device: torch.device) -> None:
    """Make `device` the calling thread's current CUDA device (a no-op for the CPU).

    CUDA's current device is per thread, and TensorRT deserialization, default streams and
    graph capture use it: every thread that runs engines or copies their outputs calls
    this first, so `--device cuda:1` never touches GPU 0.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
