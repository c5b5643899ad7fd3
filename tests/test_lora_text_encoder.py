"""LoRAs with text-encoder weights, applied per request on the torch backend.

A file with UNet weights and weights on both SDXL text encoders (CLIP-L `text_encoder`,
CLIP-bigG `text_encoder_2`), as diffusers/PEFT save it and in kohya's layout
(`lora_te1_*` / `lora_te2_*`), gives through Kiln's pipeline what diffusers'
StableDiffusionXLPipeline gives with the same file loaded by `load_lora_weights` and set by
`set_adapters` at the same scale. Tolerances: prompt embeddings within 1e-5 (float32 on
the CPU; measured 0), images within one uint8 level as every parity test here (measured
0). Scale 0 gives the base model's bytes; requests with and without text-encoder LoRAs
share UNet calls and prompt caches without seeing each other's embeddings; the
text-encoder part lives in its file's slot, so eviction and memory follow the UNet's.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lora_support import (
    TEXT_ENCODERS,
    Made,
    make_peft_lora,
    tiny_unet,
    with_text_model_level,
    write_kohya_text_encoder_lora,
)
from test_lora_pipeline import lora_pipeline, request
from test_pipeline import max_level_difference

from kiln_server.lora.errors import LoraRefused
from kiln_server.lora.layers import install_row_lora
from kiln_server.lora.reading import read_lora_file
from kiln_server.lora.stack import AdapterStack
from kiln_server.models.loader import load_modules, read_model_files
from kiln_server.pipeline.params import LoraUse
from kiln_server.pipeline.reference import DiffusersReference
from kiln_server.pipeline.sdxl import SDXLPipeline

MAX_RANK = 8
EMBEDDING_TOLERANCE = 1e-5
PEFT_RANK, PEFT_ALPHA, KOHYA_ALPHA = 4, 8, 2.0


@pytest.fixture(scope="module")
def files(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Made]:
    """`words` (PEFT: UNet and both text encoders, as diffusers saves them today),
    `old_words` (the same, keys under `text_model.` as with older transformers), `kwords`
    (the same weights in kohya's layout) and `unet_part` (kohya, `kwords`' UNet weights
    alone)."""
    folder = tmp_path_factory.mktemp("lora-text-encoder") / "loras"
    words = make_peft_lora(
        tiny_model_path,
        folder / "words.safetensors",
        rank=PEFT_RANK,
        alpha=PEFT_ALPHA,
        seed=11,
        text_encoders=True,
    )
    old_words = with_text_model_level(words, folder / "old_words.safetensors")
    kwords = write_kohya_text_encoder_lora(words, folder / "kwords.safetensors", alpha=KOHYA_ALPHA)
    unet_part = write_kohya_text_encoder_lora(
        replace(words, text_encoders={}), folder / "unet_part.safetensors", alpha=KOHYA_ALPHA
    )
    return {"words": words, "old_words": old_words, "kwords": kwords, "unet_part": unet_part}


@pytest.fixture(scope="module")
def kiln(tiny_model_path: Path, files: dict[str, Made]) -> SDXLPipeline:
    """The tiny model serving every file at once (one slot each)."""
    return lora_pipeline(tiny_model_path, files["words"].path.parent, slots=len(files))


@pytest.fixture(scope="module")
def reference(tiny_model_path: Path, files: dict[str, Made]) -> DiffusersReference:
    """diffusers' pipeline over its own components with every file loaded."""
    reference = DiffusersReference(read_model_files(tiny_model_path), load_modules(tiny_model_path))
    for name, made in files.items():
        reference.pipeline.load_lora_weights(str(made.path), adapter_name=name)
    return reference


@pytest.mark.parametrize(
    ("name", "scale"),
    [("words", PEFT_ALPHA / PEFT_RANK), ("old_words", PEFT_ALPHA / PEFT_RANK), ("kwords", 0.5)],
)
def test_both_text_encoders_are_read_with_peft_scales(
    files: dict[str, Made], name: str, scale: float
) -> None:
    made = files[name]
    weights = read_lora_file(made.path, max_rank=MAX_RANK)
    assert set(weights.text_encoders) == set(TEXT_ENCODERS)
    for encoder in TEXT_ENCODERS:
        modules = weights.text_encoders[encoder]
        assert set(modules) == set(made.text_encoders[encoder])
        for module, (down, up) in made.text_encoders[encoder].items():
            assert torch.equal(modules[module].down, down)
            assert torch.equal(modules[module].up, up)
            assert modules[module].scale == pytest.approx(scale)


@pytest.mark.parametrize("name", ["words", "old_words", "kwords"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_prompt_embeddings_equal_diffusers_encode_prompt(
    kiln: SDXLPipeline, reference: DiffusersReference, name: str, scale: float
) -> None:
    params = request(loras=(LoraUse(name, scale),))
    prompts = kiln.prepare(params).prompts
    reference.pipeline.set_adapters([name], [scale])
    theirs = reference.pipeline.encode_prompt(
        params.prompt, device=torch.device("cpu"), negative_prompt=params.negative_prompt
    )
    ours = (
        prompts.positive.hidden_states,
        prompts.negative.hidden_states,
        prompts.positive.pooled,
        prompts.negative.pooled,
    )
    for mine, diffusers in zip(ours, theirs, strict=True):
        assert (mine - diffusers).abs().max().item() <= EMBEDDING_TOLERANCE
    # Not vacuous: the LoRA moves the embeddings far beyond the tolerance.
    base = kiln.prepare(request()).prompts
    assert (prompts.positive.pooled - base.positive.pooled).abs().max().item() > 1e-2


@pytest.mark.parametrize("name", ["words", "kwords"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_text_encoder_lora_image_equals_diffusers_with_the_lora_set(
    kiln: SDXLPipeline, reference: DiffusersReference, name: str, scale: float
) -> None:
    params = request(loras=(LoraUse(name, scale),))
    ours = np.stack(kiln.generate(params))
    reference.pipeline.set_adapters([name], [scale])
    assert max_level_difference(ours, reference.generate(params)) <= 1
    if name == "kwords":
        # Not vacuous: the same UNet weights without the text-encoder part differ.
        unet_only = np.stack(kiln.generate(replace(params, loras=(LoraUse("unet_part", scale),))))
        assert max_level_difference(ours, unet_only) > 5


def test_scale_zero_and_no_lora_give_the_base_bytes_beside_cached_lora_prompts(
    kiln: SDXLPipeline, tiny_pipeline: Any
) -> None:
    base = np.stack(tiny_pipeline.generate(request())).tobytes()
    kiln.generate(request(loras=(LoraUse("words"),)))  # its prompts are cached now
    assert np.stack(kiln.generate(request(loras=(LoraUse("words", 0.0),)))).tobytes() == base
    assert np.stack(kiln.generate(request())).tobytes() == base
    # A UNet-only LoRA shares the base prompts' cache entries; a text-encoder LoRA does not.
    library = kiln.loras
    assert library is not None
    library.ensure_resident((LoraUse("unet_part"),))
    assert library.text_encoder_loras((LoraUse("unet_part"),)) is None
    words = library.text_encoder_loras((LoraUse("words", 0.5),))
    again = library.text_encoder_loras((LoraUse("words", 0.5),))
    assert words is not None and again is not None and words.key == again.key
    other = library.text_encoder_loras((LoraUse("words", 1.0),))
    assert other is not None and other.key != words.key


def test_a_batch_mixing_text_encoder_loras_and_none_gives_each_its_solo_result(
    kiln: SDXLPipeline,
) -> None:
    requests = [
        request(loras=(LoraUse("words"),), seed=1),
        request(seed=2),  # the same prompts, no LoRA
        request(loras=(LoraUse("kwords", 0.5),), seed=3, guidance_scale=1.0),
        request(loras=(LoraUse("unet_part"),), seed=4),
    ]
    solo = [np.stack(kiln.generate(params)) for params in requests]
    states = [kiln.prepare(params) for params in requests]
    while not all(state.finished for state in states):
        assert kiln.denoise_step(states).rows == 2 + 2 + 1 + 2
    for state, alone in zip(states, solo, strict=True):
        assert max_level_difference(kiln.decode(state).numpy(), alone) <= 1


def test_text_encoder_adapters_share_their_files_slot_and_memory_stays_bounded(
    tiny_model_path: Path, files: dict[str, Made], kiln: SDXLPipeline
) -> None:
    one_slot = lora_pipeline(tiny_model_path, files["words"].path.parent, slots=1)
    library = one_slot.loras
    assert library is not None
    expected = {
        name: np.stack(kiln.generate(request(loras=(LoraUse(name),))))
        for name in ("words", "kwords", "unet_part")
    }
    memory = []
    for _ in range(2):
        for name, image in expected.items():
            ours = np.stack(one_slot.generate(request(loras=(LoraUse(name),))))
            assert max_level_difference(ours, image) <= 1
            assert library.stack.resident == [name]
        memory.append(library.stack.memory_bytes())
    assert memory[0] == memory[1]
    # unet_part, last, took the slot of kwords: its text-encoder part left nothing there.
    for layers in library.stack.text_encoders.values():
        for name in layers:
            layer = layers[name]
            if layer.down is not None and layer.up is not None:
                assert not layer.filled and not layer.down[1].any() and not layer.up[1].any()


def test_a_stack_without_text_encoder_layers_refuses_such_a_file_naming_it(
    tiny_model_path: Path, files: dict[str, Made]
) -> None:
    """The compiled backends' stacks have UNet layers only: the file is refused whole."""
    stack = AdapterStack(install_row_lora(tiny_unet(tiny_model_path)), capacity=1, max_rank=8)
    weights = read_lora_file(files["kwords"].path, max_rank=MAX_RANK, name="kwords")
    with pytest.raises(LoraRefused) as caught:
        stack.load(weights)
    assert str(caught.value) == (
        "loras: kwords: it has text_encoder (text-encoder) weights, which this model's "
        "engines do not apply (text-encoder LoRAs are applied on the torch backend); use a "
        "UNet-only LoRA or serve this model on the torch backend"
    )
    assert stack.resident == [] and stack.memory_bytes() == 0
