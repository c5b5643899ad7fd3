"""Device, precision and backend resolution, with and without a GPU.

This machine has no GPU: the CPU branch runs for real, the CUDA branch is driven by
patching what torch reports (device count, bf16 support), and everything that needs a real
GPU must refuse loudly with a message naming the flag.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import start_server
from test_export_support import tiny_engines

from kiln_server.engines.base import EngineError
from kiln_server.engines.components import ModelDims, unet_spec
from kiln_server.engines.device import (
    Placement,
    dtype_name,
    resolve_device,
    resolve_dtype,
)
from kiln_server.engines.loading import choose_backend, load_engine_set
from kiln_server.engines.torch_engine import TorchEngine, vae_dtype
from kiln_server.pipeline.params import GenerationParams
from kiln_server.pipeline.sdxl import SDXLPipeline


@pytest.fixture(scope="module")
def tiny_onnx_engines(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Path:
    return tiny_engines(tmp_path_factory, tiny_model_path)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make torch report a CUDA build with two GPUs, the first without bf16."""
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Tesla T4")


def test_without_a_gpu_the_default_is_the_cpu_in_fp32() -> None:
    device = resolve_device(None)
    assert device == torch.device("cpu")
    assert resolve_dtype(None, device) == torch.float32
    assert Placement.resolve(None, None).describe() == "cpu fp32"


def test_asking_for_cuda_without_one_names_the_fix() -> None:
    with pytest.raises(EngineError, match=r"--device cuda.*(CPU-only build|no CUDA GPU)"):
        resolve_device("cuda")
    with pytest.raises(EngineError, match="use cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    with pytest.raises(EngineError, match="cpu or cuda"):
        resolve_device("mps")


def test_cpu_precisions() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("fp32", cpu) == torch.float32
    with pytest.raises(EngineError, match="fp16 needs a GPU"):
        resolve_dtype("fp16", cpu)
    with pytest.raises(EngineError, match="choose one of fp16, bf16, fp32"):
        resolve_dtype("int8", cpu)
    assert dtype_name(torch.bfloat16) == "bf16"


def test_cuda_branch_defaults_to_the_first_gpu_in_fp16(two_gpus: None) -> None:
    device = resolve_device(None)
    assert device == torch.device("cuda", 0)
    assert resolve_dtype(None, device) == torch.float16
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(EngineError, match="2 CUDA device"):
        resolve_device("cuda:2")
    with pytest.raises(EngineError, match="Tesla T4 lacks bf16"):
        resolve_dtype("bf16", device)
    placement = Placement.resolve("cuda", None, compile=True, cuda_graphs=True)
    assert placement.describe() == "cuda:0 fp16, compiled, CUDA graphs"


def test_cuda_graphs_need_a_gpu() -> None:
    with pytest.raises(EngineError, match="--cuda-graphs needs a GPU"):
        Placement.resolve("cpu", None, cuda_graphs=True)
    with pytest.raises(EngineError, match="need a CUDA device"):
        TorchEngine(
            unet_spec(ModelDims()),
            torch.nn.Identity(),
            device=torch.device("cpu"),
            cuda_graphs=True,
        )


def test_vae_precision_follows_force_upcast() -> None:
    assert vae_dtype(torch.float16, force_upcast=True) == torch.float32
    assert vae_dtype(torch.float16, force_upcast=False) == torch.float16
    assert vae_dtype(torch.bfloat16, force_upcast=True) == torch.bfloat16
    assert vae_dtype(torch.float32, force_upcast=True) == torch.float32


def test_backend_choice_says_why(two_gpus: None, tmp_path: Path) -> None:
    gpu = torch.device("cuda", 0)
    choice = choose_backend(None, None, gpu)
    assert choice.backend == "torch" and "torch on CUDA" in choice.reason
    assert choose_backend(None, None, torch.device("cpu")).reason.startswith("torch on the CPU")
    assert choose_backend("onnxruntime", None, gpu).reason == "requested with --backend"


def test_backend_choice_on_a_gpu_without_tensorrt_prefers_torch_over_cpu_graphs(
    two_gpus: None, tiny_onnx_engines: Path
) -> None:
    """ONNX graphs on a GPU host without TensorRT: torch on CUDA beats onnxruntime on the CPU."""
    gpu_choice = choose_backend(None, tiny_onnx_engines, torch.device("cuda", 0))
    assert gpu_choice.backend == "torch"
    assert "no TensorRT engines" in gpu_choice.reason
    cpu_choice = choose_backend(None, tiny_onnx_engines, torch.device("cpu"))
    assert cpu_choice.backend == "onnxruntime"


def test_bf16_on_the_cpu_runs_the_same_pipeline(tiny_model_path: Path, tiny_pipeline: Any) -> None:
    """The reduced-precision path (casts in, float32 out, VAE kept apart) on this machine."""
    from kiln_server.models.loader import read_model_files

    files = read_model_files(tiny_model_path)
    engines = load_engine_set(
        "torch", files, None, placement=Placement(torch.device("cpu"), torch.bfloat16)
    )
    assert engines.unet.dtype == torch.bfloat16  # type: ignore[attr-defined]
    assert engines.placement == "cpu bf16"
    pipeline = SDXLPipeline(files, engines)
    params = GenerationParams(prompt="a red circle", num_inference_steps=4, seed=3)
    state = pipeline.prepare(params)
    assert state.latents.dtype == torch.float32
    (image,) = pipeline.generate(params)
    (reference,) = tiny_pipeline.generate(params)
    assert image.shape == reference.shape
    # bf16 keeps 8 bits of mantissa: close to fp32, not equal.
    assert np.abs(image.astype(int) - reference.astype(int)).mean() < 8


def test_compile_wraps_only_the_unet(tiny_model_path: Path) -> None:
    """--compile compiles lazily (during warm-up), so wrapping costs nothing at load."""
    from kiln_server.models.loader import read_model_files

    files = read_model_files(tiny_model_path)
    engines = load_engine_set(
        "torch",
        files,
        None,
        placement=Placement(torch.device("cpu"), torch.float32, compile=True),
    )
    assert type(engines.unet.module).__name__ == "OptimizedModule"  # type: ignore[attr-defined]
    assert type(engines.vae_decoder.module).__name__ != "OptimizedModule"  # type: ignore[attr-defined]
    assert engines.placement == "cpu fp32, compiled"


def test_compile_is_refused_for_compiled_engines(
    tiny_model_path: Path, tiny_onnx_engines: Path
) -> None:
    from kiln_server.models.loader import read_model_files

    files = read_model_files(tiny_model_path)
    with pytest.raises(EngineError, match="--compile and --cuda-graphs apply to the torch backend"):
        load_engine_set(
            "onnxruntime",
            files,
            tiny_onnx_engines,
            placement=Placement(torch.device("cpu"), torch.float32, compile=True),
        )


def test_kiln_serve_device_cuda_without_a_gpu_exits_with_the_fix(
    tmp_path: Path, kiln_cache_dir: Path
) -> None:
    server = start_server(
        tmp_path / "server", kiln_cache_dir, "--device", "cuda", wait_serving=False
    )
    deadline = time.monotonic() + 120
    while server.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.process.wait(timeout=5) == 1
    logs = server.logs()
    assert "--device cuda" in logs and "--device cpu" in logs
    assert "Traceback" not in logs


def test_device_settings_come_from_flags_env_and_config(tmp_path: Path) -> None:
    from kiln_server.settings import SettingsError, load_settings

    config = tmp_path / "kiln.toml"
    config.write_text('[server]\ndevice = "cuda:1"\ndtype = "bf16"\ncompile = true\n')
    from_file, _ = load_settings({"config": config}, {})
    assert (from_file.device, from_file.dtype, from_file.compile) == ("cuda:1", "bf16", True)
    env = {"KILN_DEVICE": "cpu", "KILN_COMPILE": "0", "KILN_CUDA_GRAPHS": "yes"}
    from_env, _ = load_settings({"config": config}, env)
    assert (from_env.device, from_env.compile, from_env.cuda_graphs) == ("cpu", False, True)
    from_flags, _ = load_settings({"config": config, "device": "cuda", "dtype": "fp16"}, env)
    assert (from_flags.device, from_flags.dtype) == ("cuda", "fp16")
    defaults, _ = load_settings({}, {})
    assert (defaults.device, defaults.dtype, defaults.compile, defaults.cuda_graphs) == (
        None,
        None,
        False,
        False,
    )
    with pytest.raises(SettingsError, match="unknown dtype 'half'"):
        load_settings({}, {"KILN_DTYPE": "half"})


@pytest.mark.parametrize(
    ("bf16", "requested", "family", "expected"),
    [
        (True, None, "flux", torch.bfloat16),  # FLUX overflows fp16: its own bf16
        (False, None, "flux", torch.float32),  # bf16 only emulated (pre-Ampere): fp32
        (True, "fp16", "flux", torch.float16),  # asked for: kept (the server warns)
        (True, None, "sdxl", torch.float16),  # SDXL keeps the GPU default
    ],
)
def test_flux_on_a_gpu_defaults_to_bf16(
    two_gpus: None,
    monkeypatch: pytest.MonkeyPatch,
    bf16: bool,
    requested: str | None,
    family: str,
    expected: torch.dtype,
) -> None:
    capability = (8, 0) if bf16 else (7, 5)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    placement = Placement.resolve("cuda:1", requested)
    assert placement.dtype == torch.float16
    assert placement.for_family(family).dtype == expected
    # The CPU default (fp32) is every family's.
    assert Placement.resolve("cpu", None).for_family(family).dtype == torch.float32
