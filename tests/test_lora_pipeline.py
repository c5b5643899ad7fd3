"""Per-request LoRAs through Kiln's SDXL pipeline and its batcher, on the torch backend.

Pipeline: a request with a LoRA equals diffusers' StableDiffusionXLPipeline over the same
components with that file loaded by `load_lora_weights` and set by `set_adapters` (same
seeds, scheduler and steps, guidance on, so both the conditional and the unconditional
rows apply the LoRA, as diffusers does). Tolerance: one uint8 level, as the plain
pipeline's parity test (measured: 0). Scale 0 gives the base model's bytes exactly.

Batcher (the engine core's scheduler): a LoRA is read off the engine thread while the
request waits queued; a file that cannot be used fails only the requests that named it;
more distinct LoRAs than slots over time all work and the stack's memory stays the same.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lora_support import Made, make_peft_lora, write_kohya_lora
from test_batcher import MODEL, Harness
from test_pipeline import max_level_difference

from kiln_server.batcher import BatcherSettings
from kiln_server.engines.torch_engine import load_torch_engines, torch_lora_library
from kiln_server.events import Failed, Finished, Queued, Started
from kiln_server.lora import library as library_module
from kiln_server.lora.folders import LoraFolders
from kiln_server.lora.library import LOADER_THREAD
from kiln_server.lora.policy import refusal_for_backend
from kiln_server.models.loader import load_modules, read_model_files
from kiln_server.pipeline.params import GenerationParams, LoraUse
from kiln_server.pipeline.reference import DiffusersReference
from kiln_server.pipeline.sdxl import SDXLPipeline

SLOTS = 2
MAX_RANK = 8


@pytest.fixture(scope="module")
def lora_files(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Made]:
    """`alpha` (PEFT r=4), `beta` (PEFT r=2) and `kohya` (kohya, with a conv), plus an
    unreadable `broken.safetensors`, in one folder."""
    root = tmp_path_factory.mktemp("lora-pipeline")
    (root / "model").symlink_to(tiny_model_path)
    folder = root / "loras"
    alpha = make_peft_lora(tiny_model_path, folder / "alpha.safetensors", rank=4, alpha=8, seed=1)
    beta = make_peft_lora(tiny_model_path, folder / "beta.safetensors", rank=2, alpha=2, seed=2)
    kohya = write_kohya_lora(alpha, folder / "kohya.safetensors", alpha=2.0, seed=3)
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    return {"alpha": alpha, "beta": beta, "kohya": kohya}


def lora_pipeline(model: Path, folder: Path, slots: int = SLOTS) -> SDXLPipeline:
    """A fresh tiny-model pipeline serving the LoRAs of `folder` with `slots` slots."""
    files = read_model_files(model)
    engines = load_torch_engines(load_modules(model), files.dims)
    pipeline = SDXLPipeline(files, engines)
    pipeline.loras = torch_lora_library(
        engines, LoraFolders.of([folder]), slots=slots, max_rank=MAX_RANK
    )
    return pipeline


@pytest.fixture(scope="module")
def kiln(tiny_model_path: Path, lora_files: dict[str, Made]) -> SDXLPipeline:
    """The tiny model with per-row LoRA layers and a 2-slot stack."""
    return lora_pipeline(tiny_model_path, lora_files["alpha"].path.parent)


@pytest.fixture(scope="module")
def reference(tiny_model_path: Path, lora_files: dict[str, Made]) -> DiffusersReference:
    """diffusers' SDXL pipeline over its own copy of the components, every LoRA loaded."""
    reference = DiffusersReference(read_model_files(tiny_model_path), load_modules(tiny_model_path))
    for name, made in lora_files.items():
        reference.pipeline.load_lora_weights(str(made.path), adapter_name=name)
    return reference


def request(**overrides: Any) -> GenerationParams:
    """A short guided request on the tiny model."""
    base = GenerationParams(
        prompt="a red circle",
        negative_prompt="blurry",
        num_inference_steps=4,
        guidance_scale=5.0,
        seed=21,
        width=64,
        height=64,
        model=MODEL,
    )
    return replace(base, **overrides)


@pytest.mark.parametrize(
    ("name", "scale", "scheduler"),
    [("alpha", 1.0, "K_EULER"), ("beta", 0.5, "DPMSolverMultistep"), ("kohya", 0.8, "K_EULER")],
)
def test_lora_request_equals_diffusers_with_the_lora_set(
    kiln: SDXLPipeline,
    reference: DiffusersReference,
    tiny_pipeline: Any,
    name: str,
    scale: float,
    scheduler: str,
) -> None:
    params = request(loras=(LoraUse(name, scale),), scheduler=scheduler, num_outputs=2)
    ours = np.stack(kiln.generate(params))
    reference.pipeline.set_adapters([name], [scale])
    theirs = reference.generate(params)
    assert max_level_difference(ours, theirs) <= 1
    # Not vacuous: the LoRA changes the image well beyond the tolerance.
    base = np.stack(tiny_pipeline.generate(replace(params, loras=())))
    assert max_level_difference(ours, base) > 10


def test_scale_zero_and_no_lora_give_the_base_models_bytes(
    kiln: SDXLPipeline, tiny_pipeline: Any
) -> None:
    base = np.stack(tiny_pipeline.generate(request()))
    assert np.stack(kiln.generate(request())).tobytes() == base.tobytes()
    off = request(loras=(LoraUse("alpha", 0.0),))
    assert np.stack(kiln.generate(off)).tobytes() == base.tobytes()


def test_mixed_loras_share_each_unet_call_and_equal_solo_runs(kiln: SDXLPipeline) -> None:
    requests = [
        request(loras=(LoraUse("alpha"),), seed=1),
        request(loras=(LoraUse("beta", 0.5),), seed=2, prompt="a blue square"),
        request(seed=3, guidance_scale=1.0),
    ]
    solo = [np.stack(kiln.generate(params)) for params in requests]
    states = [kiln.prepare(params) for params in requests]
    while not all(state.finished for state in states):
        result = kiln.denoise_step(states)
        assert result.rows == 2 + 2 + 1  # one UNet call for the three requests
    for state, alone in zip(states, solo, strict=True):
        batched = kiln.decode(state).numpy()
        assert max_level_difference(batched, alone) <= 1


# ----- batcher: hot loading, failures, eviction -----


@pytest.fixture
def served(tiny_model_path: Path, lora_files: dict[str, Made]) -> Iterator[tuple[Any, Any]]:
    """A running batcher over a fresh LoRA pipeline, and that pipeline."""
    pipeline = lora_pipeline(tiny_model_path, lora_files["alpha"].path.parent)
    harness = Harness(pipeline, BatcherSettings(default_max_batch_rows=16))
    harness.batcher.start()
    yield harness, pipeline
    harness.batcher.stop()


def _started(recorder: Any) -> bool:
    return bool(recorder.of(Started))


def test_a_lora_not_resident_is_read_off_the_engine_thread_while_its_request_waits(
    served: tuple[Any, Any], kiln: SDXLPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness, pipeline = served
    release = threading.Event()
    readers: list[str] = []
    real_read = library_module.read_lora_file

    def slow_read(*args: Any, **kwargs: Any) -> Any:
        readers.append(threading.current_thread().name)
        assert release.wait(30)
        return real_read(*args, **kwargs)

    monkeypatch.setattr(library_module, "read_lora_file", slow_read)
    with_lora = request(loras=(LoraUse("alpha"),), seed=5)
    harness.submit("lora", with_lora)
    harness.submit("plain", request(seed=6))
    harness.recorders["plain"].wait()
    lora = harness.recorders["lora"]
    assert readers == [LOADER_THREAD]
    # The plain request ran to the end while the LoRA's file was still being read.
    assert lora.of(Queued) and not _started(lora) and not lora.done.is_set()
    release.set()
    lora.wait()
    assert lora.of(Finished), lora.events
    assert max_level_difference(lora.pixels, np.stack(kiln.generate(with_lora))) <= 1
    assert pipeline.loras.stack.resident == ["alpha"]


def test_an_unusable_lora_fails_only_its_own_request(served: tuple[Any, Any]) -> None:
    harness, _ = served
    harness.submit("broken", request(loras=(LoraUse("broken"),)))
    harness.submit("missing", request(loras=(LoraUse("gone"),)))
    harness.submit("plain", request())
    for rid in ("broken", "missing", "plain"):
        harness.recorders[rid].wait()
    [broken] = harness.recorders["broken"].of(Failed)
    assert broken.code == "INVALID_ARGUMENT"
    assert broken.message.startswith("loras: broken: not a readable .safetensors file")
    [missing] = harness.recorders["missing"].of(Failed)
    assert missing.code == "INVALID_ARGUMENT"
    assert missing.message == "loras: gone: no such LoRA file in the configured LoRA folders"
    assert harness.recorders["plain"].of(Finished)


def test_more_loras_than_slots_over_time_all_work_in_constant_memory(
    served: tuple[Any, Any], kiln: SDXLPipeline
) -> None:
    harness, pipeline = served
    names = ["alpha", "beta", "kohya"]  # three LoRAs, two slots
    expected = {
        name: np.stack(kiln.generate(request(loras=(LoraUse(name, 0.9),)))) for name in names
    }
    memory = []
    for round_ in range(3):
        for name in names:
            rid = f"{name}-{round_}"
            harness.submit(rid, request(loras=(LoraUse(name, 0.9),)))
            harness.recorders[rid].wait()
            assert max_level_difference(harness.recorders[rid].pixels, expected[name]) <= 1
        memory.append(pipeline.loras.stack.memory_bytes())
        assert len(pipeline.loras.stack.resident) == SLOTS
    assert memory[0] == memory[1] == memory[2] > 0


def test_loras_together_in_one_batch_from_the_queue(
    served: tuple[Any, Any], kiln: SDXLPipeline
) -> None:
    harness, _ = served
    requests = {
        "a": request(loras=(LoraUse("alpha"),), seed=1),
        "b": request(loras=(LoraUse("beta", 0.5),), seed=2),
        "none": request(seed=3),
    }
    for rid, params in requests.items():
        harness.submit(rid, params)
    for rid, params in requests.items():
        harness.recorders[rid].wait()
        alone = np.stack(kiln.generate(params))
        assert max_level_difference(harness.recorders[rid].pixels, alone) <= 1


def test_a_model_without_lora_support_refuses_loras_at_once(tiny_pipeline: Any) -> None:
    harness = Harness(tiny_pipeline, BatcherSettings())
    harness.batcher.start()
    try:
        harness.submit("lora", request(loras=(LoraUse("alpha"),)))
        recorder = harness.recorders["lora"]
        recorder.wait()
        [failed] = recorder.of(Failed)
        assert failed.code == "INVALID_ARGUMENT"
        assert failed.message.startswith("loras: this model has no LoRA folders")
    finally:
        harness.batcher.stop()


def test_unet_calls_with_lora_rows_run_the_uncompiled_module(
    kiln: SDXLPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compiled module or a captured CUDA graph holds the base layers' path only, so a
    call with LoRA rows must take the eager module; calls without keep the fast path."""
    engine = kiln.engines.unet
    fast_calls: list[int] = []
    eager = engine.eager_module  # type: ignore[attr-defined]

    def fast(*args: Any) -> Any:
        fast_calls.append(args[0].shape[0])
        return eager(*args)

    monkeypatch.setattr(engine, "module", fast)
    kiln.generate(request(loras=(LoraUse("alpha"),), num_inference_steps=2))
    assert fast_calls == []
    kiln.generate(request(num_inference_steps=2))
    assert fast_calls == [2, 2]


def test_backends_without_lora_inputs_refuse_loras_naming_the_backend(
    tiny_pipeline: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert refusal_for_backend("torch") is None
    assert refusal_for_backend("onnxruntime") is None  # when its graphs have LoRA inputs
    message = (
        "loras: LoRAs need one of the backends onnxruntime, tensorrt, torch; this model runs on mlx"
    )
    assert refusal_for_backend("mlx") == message
    monkeypatch.setattr(tiny_pipeline.engines, "backend", "mlx")
    harness = Harness(tiny_pipeline, BatcherSettings())
    harness.submit("lora", request(loras=(LoraUse("alpha"),)))  # refused before the queue
    [failed] = harness.recorders["lora"].of(Failed)
    assert (failed.code, failed.message) == ("FAILED_PRECONDITION", message)
