"""What this machine offers the TensorRT backend: TensorRT itself, CUDA, and the GPU.

Nothing here imports TensorRT at module import time, so the rest of Kiln works without it.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from kiln_server.engines.base import EngineError
from kiln_server.engines.manifest import INSTALL_TENSORRT, MachineInfo


def tensorrt_missing() -> list[str]:
    """What the TensorRT backend lacks here, as phrases (empty when it can run).

    Checks that the `tensorrt` package imports, that it is TensorRT 10, and that torch sees
    a CUDA device (buffers and the stream are torch CUDA objects).
    """
    missing: list[str] = []
    if importlib.util.find_spec("tensorrt") is None:
        missing.append("the TensorRT Python package (`import tensorrt` fails)")
    else:
        try:
            trt = importlib.import_module("tensorrt")
            major = str(getattr(trt, "__version__", "0")).split(".", 1)[0]
            if major != "10":
                missing.append(f"TensorRT 10 (found TensorRT {trt.__version__})")
        except Exception as exc:  # a broken install raises anything from its loader
            missing.append(f"a working TensorRT Python package (`import tensorrt` fails: {exc})")
    import torch

    if not torch.backends.cuda.is_built():
        missing.append(f"a CUDA build of torch (this torch {torch.__version__} is CPU-only)")
    elif not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False: no device or driver)")
    return missing


def require_tensorrt(purpose: str) -> Any:
    """Return the imported `tensorrt` module, or raise EngineError naming what is missing.

    The message names each missing piece and how to install TensorRT; `purpose` says what
    was being attempted ("build TensorRT engines", "serve with --backend tensorrt").
    """
    missing = tensorrt_missing()
    if missing:
        raise EngineError(
            f"cannot {purpose}: this machine lacks {' and '.join(missing)}. TensorRT needs an "
            f"NVIDIA GPU with a CUDA build of torch; install TensorRT with `{INSTALL_TENSORRT}`"
        )
    return importlib.import_module("tensorrt")


def probe_machine(purpose: str = "use TensorRT", device: int = 0) -> MachineInfo:
    """GPU name, compute capability, TensorRT and CUDA versions of this machine.

    Requires TensorRT and CUDA (EngineError from `require_tensorrt(purpose)` otherwise).
    """
    trt = require_tensorrt(purpose)
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return MachineInfo(
        gpu_name=torch.cuda.get_device_name(device),
        compute_capability=f"{major}.{minor}",
        tensorrt_version=str(trt.__version__),
        cuda_version=str(torch.version.cuda or "unknown"),
    )
