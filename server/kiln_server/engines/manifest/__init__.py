"""The engine manifest: what was built, from which model, for which machine; and its checks.

`build-engines` writes `manifest.json` beside the engine files. The server reads it and
checks it against the model it serves and the machine it runs on before it loads anything,
so the usual TensorRT failures ("engine plan file is generated on an incompatible device",
"version tag does not match") become one clear message that names the differing value and
the `kiln build-engines` command that fixes it.

Layout: one `onnx` section (the graphs are portable) and a list of `tensorrt` builds, one per
machine (GPU, compute capability, TensorRT and CUDA versions): engine file names carry the
machine, so builds for two GPUs live side by side in one directory. Each TensorRT engine
also records whether it is refittable and how it compared with onnxruntime after the build
(`numerics`, see engine_numerics.py).

Modules: `records` (the dataclasses), `json_format` (reading and writing manifest.json),
`checks` (the checks before loading), `commands` (the command lines messages recommend).
The names below are the package's interface.
"""

from kiln_server.engines.manifest.checks import (
    CheckContext,
    check_onnx_engines,
    check_tensorrt_engines,
    file_sha256,
    interface_mismatch,
)
from kiln_server.engines.manifest.commands import INSTALL_TENSORRT, build_command
from kiln_server.engines.manifest.json_format import (
    manifest_from_json,
    manifest_to_json,
    read_manifest,
    write_manifest,
)
from kiln_server.engines.manifest.records import (
    MANIFEST_NAME,
    MANIFEST_VERSION,
    LoraRecord,
    MachineInfo,
    Manifest,
    ModelRecord,
    OnnxComponent,
    TensorEntry,
    TensorRTBuild,
    TensorRTComponent,
    cuda_major,
    machine_mismatches,
    tensor_entries,
)

__all__ = [
    "INSTALL_TENSORRT",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "CheckContext",
    "LoraRecord",
    "MachineInfo",
    "Manifest",
    "ModelRecord",
    "OnnxComponent",
    "TensorEntry",
    "TensorRTBuild",
    "TensorRTComponent",
    "build_command",
    "check_onnx_engines",
    "check_tensorrt_engines",
    "cuda_major",
    "file_sha256",
    "interface_mismatch",
    "machine_mismatches",
    "manifest_from_json",
    "manifest_to_json",
    "read_manifest",
    "tensor_entries",
    "write_manifest",
]
