"""Per-row LoRAs on the onnxruntime backend: the UNet graph built with LoRA inputs.

The tiny model is exported once with `kiln build-engines --lora-slots 2 --max-lora-rank 8
--max-loras-per-request 2`. Its UNet graph, fed from an adapter stack by the LoRA library,
matches the torch backend's per-row LoRA UNet (itself tested against diffusers with the
LoRA loaded, test_lora_pipeline.py) within the export validation's and the plain backend
test's tolerance: relative error (max |ort - torch| / max |torch|) at most 1e-3, for one
LoRA, for a mixed batch row by row, with a conv (kohya LoCon) LoRA. Measured: about 1e-6,
and 1.2e-4 at scale -1.5, where the random LoRA makes the tiny UNet ill-conditioned (the
eager graph formulation equals the torch per-row layers bit for bit there, so the gap is
onnxruntime's kernels, as for the plain UNet). Rows without a LoRA (or at scale 0) give
the base output of the same graph bit for bit, so on one server a request at scale 0 gets
the bytes of the same request without LoRAs. Through `kiln serve --backend onnxruntime`,
a request with a LoRA gives the torch backend's image within the plain ONNX parity
(PSNR >= 50 dB).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lora_support import Made, make_peft_lora, write_kohya_lora
from PIL import Image
from test_export_support import MODEL_NAME, tiny_engines

from kiln_server.engines.base import EngineError, EngineSet
from kiln_server.engines.components import (
    LORA_SCALES_INPUT,
    LORA_SLOTS_INPUT,
    ShapeRequest,
    sdxl_component_specs,
)
from kiln_server.engines.manifest import LoraRecord, read_manifest
from kiln_server.engines.sample_inputs import sample_inputs
from kiln_server.lora.folders import LoraFolders
from kiln_server.lora.library import LoraLibrary
from kiln_server.lora.policy import refusal_for_engines
from kiln_server.lora.serving import LoraSettings, engine_lora_library
from kiln_server.pipeline.params import GenerationParams, LoraUse

SLOTS, RANK, PER_REQUEST = 2, 8, 2
SETTINGS = LoraSettings(SLOTS, RANK, PER_REQUEST)
RTOL = 1e-3
MIN_PSNR_DB = 50.0
BASE_INPUTS = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Path:
    """An engines root with the tiny model's graphs, the UNet's with LoRA inputs."""
    from kiln_client.cli import main

    root = tmp_path_factory.mktemp("lora-engines")
    flags = ["--lora-slots", str(SLOTS), "--max-lora-rank", str(RANK)]
    flags += ["--max-loras-per-request", str(PER_REQUEST)]
    command = ["build-engines", "--model", MODEL_NAME, "--model-path", str(tiny_model_path)]
    assert main([*command, "--out", str(root), "--quiet", "--no-validate", *flags]) == 0
    return root


@pytest.fixture(scope="module")
def lora_files(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Made]:
    """`alpha` (PEFT r=4 on attention) and `kohya` (r=4, with a 3x3 conv), in one folder."""
    root = tmp_path_factory.mktemp("lora-onnx")
    (root / "model").symlink_to(tiny_model_path)
    folder = root / "loras"
    alpha = make_peft_lora(tiny_model_path, folder / "alpha.safetensors", rank=4, alpha=8, seed=1)
    kohya = write_kohya_lora(alpha, folder / "kohya.safetensors", alpha=2.0, seed=3)
    return {"alpha": alpha, "kohya": kohya}


@pytest.fixture(scope="module")
def files(tiny_model_path: Path) -> Any:
    from kiln_server.models.loader import read_model_files

    return read_model_files(tiny_model_path)


@pytest.fixture(scope="module")
def folders(lora_files: dict[str, Made]) -> LoraFolders:
    return LoraFolders.of([lora_files["alpha"].path.parent])


@pytest.fixture(scope="module")
def ort(files: Any, lora_root: Path, folders: LoraFolders) -> tuple[EngineSet, LoraLibrary]:
    """The LoRA engines on onnxruntime with a 2-slot library feeding the UNet."""
    from kiln_server.engines.loading import load_engine_set

    engines = load_engine_set("onnxruntime", files, lora_root / MODEL_NAME)
    library = engine_lora_library(engines, folders, SETTINGS)
    assert library is not None
    return engines, library


@pytest.fixture(scope="module")
def torch_side(
    files: Any, tiny_model_path: Path, folders: LoraFolders
) -> tuple[EngineSet, LoraLibrary]:
    """The torch backend's per-row LoRA UNet over the same folder."""
    from kiln_server.engines.torch_engine import load_torch_engines
    from kiln_server.models.loader import load_modules

    engines = load_torch_engines(load_modules(tiny_model_path), files.dims)
    library = engine_lora_library(engines, folders, SETTINGS)
    assert library is not None
    return engines, library


def unet_inputs(files: Any, rows: int, seed: int) -> dict[str, torch.Tensor]:
    spec = sdxl_component_specs(files.dims)["unet"]
    return sample_inputs(spec, ShapeRequest(rows, 64, 64), seed=seed)


def run(side: tuple[EngineSet, LoraLibrary], inputs: dict[str, torch.Tensor], rows: Any) -> Any:
    """One UNet call with each row's LoRAs (LoraUse lists) set through the library."""
    engines, library = side
    uses = [library.uses(row) for row in rows]
    library.ensure_resident([use for row in uses for use in row])
    library.assign(uses)
    try:
        return engines.unet.infer(inputs)["noise_pred"]
    finally:
        library.assign([])


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def test_the_manifest_and_the_unet_declaration_carry_the_lora_inputs(
    lora_root: Path, ort: tuple[EngineSet, LoraLibrary]
) -> None:
    manifest = read_manifest(lora_root / MODEL_NAME)
    assert manifest.lora == LoraRecord(SLOTS, RANK, PER_REQUEST)
    spec = ort[0].unet.spec
    assert spec.lora is not None
    names = [t.name for t in spec.inputs]
    assert names[:7] == [*BASE_INPUTS, LORA_SLOTS_INPUT, LORA_SCALES_INPUT]
    conv = spec.tensor("lora_down.down_blocks.0.resnets.0.conv1")
    assert conv.dims == (SLOTS + 1, RANK, 32, 3, 3)
    assert spec.tensor("lora_up.down_blocks.0.resnets.0.conv1").dims == (SLOTS + 1, 32, RANK)
    assert spec.tensor(LORA_SLOTS_INPUT).dims == ("batch", PER_REQUEST)
    # Every layer the torch backend's per-row layers wrap has its two stacks.
    assert len(names) == 7 + 2 * len(spec.lora.layers)


@pytest.mark.parametrize(("name", "scale"), [("alpha", 0.7), ("kohya", 1.0), ("alpha", -1.5)])
def test_one_lora_matches_the_torch_per_row_unet(
    files: Any,
    ort: tuple[EngineSet, LoraLibrary],
    torch_side: tuple[EngineSet, LoraLibrary],
    name: str,
    scale: float,
) -> None:
    inputs = unet_inputs(files, 2, seed=7)
    rows = [[LoraUse(name, scale)]] * 2
    want = run(torch_side, inputs, rows)
    got = run(ort, inputs, rows)
    assert relative_error(got, want) <= RTOL
    # Not vacuous: the LoRA moves the prediction far beyond the tolerance.
    base = run(torch_side, inputs, [[], []])
    assert relative_error(base, want) > 100 * RTOL


def test_a_mixed_batch_matches_torch_row_by_row(
    files: Any,
    ort: tuple[EngineSet, LoraLibrary],
    torch_side: tuple[EngineSet, LoraLibrary],
) -> None:
    """Rows with different LoRAs, scales, two LoRAs, none, and scale 0, in one ORT call."""
    rows = [
        [LoraUse("alpha", 1.0)],
        [LoraUse("kohya", 0.5)],
        [],
        [LoraUse("alpha", 0.3), LoraUse("kohya", 0.8)],
        [LoraUse("kohya", 0.0)],
    ]
    inputs = unet_inputs(files, len(rows), seed=8)
    got = run(ort, inputs, rows)
    for index, row in enumerate(rows):
        alone = {name: value[index : index + 1] for name, value in inputs.items()}
        want = run(torch_side, alone, [row])
        assert relative_error(got[index : index + 1], want) <= RTOL, row


def test_rows_without_a_lora_are_the_base_output_bit_for_bit(
    files: Any,
    ort: tuple[EngineSet, LoraLibrary],
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_path: Path,
) -> None:
    """In a mixed batch, rows without a LoRA (or at scale 0) equal, bit for bit, the same
    rows of a call where no row has one: the graph selects their base output. That base
    path equals the graph built without LoRA inputs within 1e-5 relative (measured: about
    1e-6): onnxruntime fuses the base operations differently around the LoRA selects."""
    from kiln_server.engines.loading import load_engine_set

    inputs = unet_inputs(files, 3, seed=9)
    base = run(ort, inputs, [[], [], []])
    mixed = run(ort, inputs, [[LoraUse("alpha", 1.0)], [], [LoraUse("kohya", 0.0)]])
    assert torch.equal(mixed[1:], base[1:])
    assert relative_error(mixed[:1], base[:1]) > 100 * RTOL
    plain = load_engine_set("onnxruntime", files, tiny_engines(tmp_path_factory, tiny_model_path))
    assert relative_error(base, plain.unet.infer(inputs)["noise_pred"]) <= 1e-5


def test_the_stacks_are_bound_from_the_adapter_stack_not_copied(
    ort: tuple[EngineSet, LoraLibrary],
) -> None:
    engines, library = ort
    library.ensure_resident([LoraUse("alpha")])
    library.assign([[LoraUse("alpha")]])
    feed = engines.unet.lora.feed  # type: ignore[attr-defined]
    name = next(layer for layer in feed.layers if feed.layers[layer].down is not None)
    fed = feed.inputs(1)
    assert fed[f"lora_down.{name}"].data_ptr() == feed.layers[name].down.data_ptr()
    slot = library.stack.slot_of("alpha")
    assert fed[LORA_SLOTS_INPUT].tolist() == [[slot, 0]]
    library.assign([])
    assert feed.inputs(1)[LORA_SCALES_INPUT].tolist() == [[0.0, 0.0]]


def test_settings_the_engines_were_not_built_for_are_named(
    files: Any, lora_root: Path, folders: LoraFolders
) -> None:
    from kiln_server.engines.loading import load_engine_set

    engines = load_engine_set("onnxruntime", files, lora_root / MODEL_NAME)
    cases = {
        LoraSettings(4, RANK, PER_REQUEST): "lora_slots is 4 but the engines were built with "
        "--lora-slots 2",
        LoraSettings(SLOTS, 16, PER_REQUEST): "max_lora_rank is 16 but the engines were built "
        "with --max-lora-rank 8",
        LoraSettings(SLOTS, RANK, 3): "max_loras_per_request is 3 but the engines take at most 2",
    }
    for settings, message in cases.items():
        with pytest.raises(EngineError) as raised:
            engine_lora_library(engines, folders, settings)
        text = str(raised.value)
        assert message in text
        assert "kiln build-engines --model kiln-tiny-sdxl --format onnx" in text
        assert f"--lora-slots {settings.slots} --max-lora-rank {settings.max_rank}" in text
    # Fewer LoRAs per request than built is served.
    assert engine_lora_library(engines, folders, LoraSettings(SLOTS, RANK, 1)) is not None


def test_engines_without_lora_inputs_refuse_loras_naming_the_rebuild(
    files: Any,
    folders: LoraFolders,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_path: Path,
) -> None:
    from kiln_server.engines.loading import load_engine_set

    plain = load_engine_set("onnxruntime", files, tiny_engines(tmp_path_factory, tiny_model_path))
    assert refusal_for_engines(plain) is None  # no LoRA folders: nothing to refuse yet
    assert engine_lora_library(plain, folders, SETTINGS) is None
    refusal = refusal_for_engines(plain)
    assert refusal is not None
    assert refusal.startswith("loras: this model's onnxruntime engines were built without LoRA")
    assert "kiln build-engines --model kiln-tiny-sdxl --format onnx" in refusal
    assert "--lora-slots 2 --max-lora-rank 8 --max-loras-per-request 2" in refusal


def test_the_engine_core_refuses_a_lora_request_on_engines_without_lora_inputs(
    files: Any,
    folders: LoraFolders,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_path: Path,
) -> None:
    """Before the queue, FAILED_PRECONDITION naming `loras` and the rebuild command."""
    from test_batcher import MODEL, Harness

    from kiln_server.batcher import BatcherSettings
    from kiln_server.engines.loading import load_engine_set
    from kiln_server.events import Failed
    from kiln_server.pipeline.sdxl import SDXLPipeline

    plain = load_engine_set("onnxruntime", files, tiny_engines(tmp_path_factory, tiny_model_path))
    assert engine_lora_library(plain, folders, SETTINGS) is None
    harness = Harness(SDXLPipeline(files, plain), BatcherSettings())
    params = GenerationParams(prompt="a red circle", model=MODEL, loras=(LoraUse("alpha"),))
    harness.submit("lora", params)
    [failed] = harness.recorders["lora"].of(Failed)
    assert failed.code == "FAILED_PRECONDITION"
    assert failed.message == refusal_for_engines(plain)


def test_a_row_without_a_lora_keeps_a_negative_zero_base_output() -> None:
    """The promise in its sharpest form: a row without a LoRA gets the base layer's output
    itself (-0.0 stays -0.0); a row with a LoRA whose slot in this layer is all zero gets
    the base plus an exact zero (the same value, the sign of a zero aside)."""
    from kiln_server.engines.components import LoraInputs, LoraLayerSpec
    from kiln_server.lora.graph import LoraUNetModule

    class Inner(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unet = torch.nn.Sequential(torch.nn.Linear(1, 2))

        def forward(self, sample: torch.Tensor, *conditioning: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.unet(sample)
            return out

    inner = Inner()
    with torch.no_grad():
        inner.unet[0].weight.fill_(-0.0)
        inner.unet[0].bias.fill_(-0.0)
    lora = LoraInputs(2, 1, 1, (LoraLayerSpec("0", (1,), 2),))
    module = LoraUNetModule(inner, lora)
    down = torch.zeros(3, 1, 1)
    up = torch.zeros(3, 2, 1)
    down[1], up[1] = 1.0, 1.0  # slot 1: delta = x on both outputs; slot 2 all zero
    sample = torch.ones(3, 1)  # with -0.0 weights and bias, the base output is -0.0
    slots = torch.tensor([[1], [0], [2]])
    scales = torch.tensor([[0.5], [0.0], [1.0]])
    rest = [torch.zeros(3)] * 4
    with torch.no_grad():
        out = module(sample, *rest, slots, scales, down, up)
    assert out[0].tolist() == [0.5, 0.5]
    assert torch.equal(out[1], torch.zeros(2)) and bool(torch.signbit(out[1]).all())
    assert out[2].tolist() == [0.0, 0.0] and not bool(torch.signbit(out[2]).any())


def test_a_partial_set_of_lora_inputs_is_refused(
    files: Any, ort: tuple[EngineSet, LoraLibrary]
) -> None:
    inputs = unet_inputs(files, 1, seed=3)
    inputs[LORA_SLOTS_INPUT] = torch.zeros((1, PER_REQUEST), dtype=torch.int64)
    with pytest.raises(EngineError, match="give every LoRA input or none"):
        ort[0].unet.infer(inputs)


def test_build_engines_refuses_a_lora_flag_below_one(capsys: pytest.CaptureFixture[str]) -> None:
    from kiln_client.cli import main

    for flag in ("--lora-slots", "--max-lora-rank", "--max-loras-per-request"):
        with pytest.raises(SystemExit) as exited:
            main(["build-engines", flag, "0"])
        assert exited.value.code == 2
        assert f"{flag} 0 must be at least 1" in capsys.readouterr().err


# ------------------------------------------------------------------ a real server


@pytest.fixture(scope="module")
def ort_server(
    tmp_path_factory: pytest.TempPathFactory,
    kiln_cache_dir: Path,
    tiny_model_path: Path,
    lora_root: Path,
    lora_files: dict[str, Made],
) -> Iterator[Any]:
    from conftest import start_server

    root = tmp_path_factory.mktemp("lora-onnx-server")
    config = f"""
[server]
default_model = "{MODEL_NAME}"
lora_slots = {SLOTS}
max_lora_rank = {RANK}
max_loras_per_request = {PER_REQUEST}

[[models]]
name = "{MODEL_NAME}"
path = "{tiny_model_path}"
default_num_inference_steps = 4
lora_dirs = ["{lora_files["alpha"].path.parent}"]
"""
    server = start_server(
        root / "server",
        kiln_cache_dir,
        "--backend",
        "onnxruntime",
        "--engines",
        str(lora_root),
        config=config,
    )
    yield server
    server.terminate()


def test_a_generation_with_a_lora_through_the_server_matches_torch(
    ort_server: Any, tiny_model_path: Path, folders: LoraFolders
) -> None:
    import grpc

    from kiln_client.proto.kiln.v1 import generation_service_pb2_grpc as pb_grpc
    from kiln_client.requests import build_request
    from kiln_server.engines.torch_engine import load_torch_engines
    from kiln_server.models.loader import load_modules, read_model_files
    from kiln_server.pipeline.sdxl import SDXLPipeline

    params = GenerationParams(
        prompt="a red circle",
        negative_prompt="blurry",
        num_inference_steps=4,
        width=64,
        height=64,
        seed=21,
        loras=(LoraUse("kohya", 0.8),),
    )
    files = read_model_files(tiny_model_path)
    engines = load_torch_engines(load_modules(tiny_model_path), files.dims)
    reference = SDXLPipeline(files, engines)
    reference.loras = engine_lora_library(engines, folders, SETTINGS)
    (want,) = reference.generate(params)
    (base,) = reference.generate(replace(params, loras=()))

    with grpc.insecure_channel(ort_server.address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        request = build_request(
            params.prompt,
            negative_prompt=params.negative_prompt,
            num_inference_steps=params.num_inference_steps,
            width=64,
            height=64,
            seed=params.seed,
            loras=[("kohya", 0.8)],
        )
        events = list(stub.Generate(request, timeout=120))
    [image] = [e.image for e in events if e.WhichOneof("event") == "image"]
    got = np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB"))
    assert psnr(got, want) >= MIN_PSNR_DB
    assert psnr(got, base) < MIN_PSNR_DB - 10  # the LoRA shows, far beyond the tolerance


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
