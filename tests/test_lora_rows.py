"""Per-row LoRAs in one UNet call (kiln_server.lora) against diffusers' own LoRA loading.

LoRA files are made the way real ones are: a diffusers/PEFT file from peft's `LoraConfig`
on the tiny UNet (saved by diffusers' `save_lora_weights` with its adapter metadata), and a
kohya / A1111 file (`lora_unet_*.lora_down.weight`, `.lora_up.weight`, `.alpha`, with a
conv layer) written from the same random weights. The reference for every row is
diffusers' UNet with that row's LoRA loaded by `load_lora_weights` and set by
`set_adapters`. Tolerance, fp32 on CPU: 1e-5 absolute (measured: 0 for single LoRAs at
power-of-two scales, 2e-6 for two LoRAs on one row, 9e-7 for the kohya file); rows without
a LoRA, or at scale 0, are compared bit for bit with the base UNet.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from lora_support import (
    CONV_MODULE,
    Made,
    make_peft_lora,
    record_opens,
    tiny_unet,
    write_kohya_lora,
)
from safetensors.torch import save_file

from kiln_server.lora.errors import LoraNotFound, LoraRefused, StackFull
from kiln_server.lora.folders import LoraFolders
from kiln_server.lora.layers import RowLoraConv2d, install_row_lora
from kiln_server.lora.reading import read_lora_file
from kiln_server.lora.stack import AdapterStack, LoraUse
from kiln_server.lora.weights import LoraWeights

TOLERANCE = 1e-5
MAX_RANK = 8


@pytest.fixture(scope="module")
def lora_files(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Made]:
    """Three LoRA files in one folder: `one` (PEFT r=4), `two` (PEFT r=2), `kohya`."""
    root = tmp_path_factory.mktemp("lora-files")
    (root / "model").symlink_to(tiny_model_path)
    folder = root / "loras"
    one = make_peft_lora(tiny_model_path, folder / "one.safetensors", rank=4, alpha=8, seed=1)
    two = make_peft_lora(tiny_model_path, folder / "two.safetensors", rank=2, alpha=2, seed=2)
    kohya = write_kohya_lora(one, folder / "kohya.safetensors", alpha=2.0, seed=3)
    return {"one": one, "two": two, "kohya": kohya}


@pytest.fixture(scope="module")
def folders(lora_files: dict[str, Made]) -> LoraFolders:
    """The configured LoRA folders: the one holding the test files."""
    return LoraFolders.of([lora_files["one"].path.parent])


@pytest.fixture(scope="module")
def unet_inputs() -> dict[str, Any]:
    """One UNet call's inputs for 5 rows of the tiny model."""
    generator = torch.Generator().manual_seed(7)
    rows = 5
    return {
        "sample": torch.randn(rows, 4, 8, 8, generator=generator),
        "timestep": torch.tensor([999.0, 700.0, 500.0, 300.0, 20.0]),
        "encoder_hidden_states": torch.randn(rows, 77, 64, generator=generator),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(rows, 32, generator=generator),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * rows),
        },
    }


def _run(unet: Any, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = unet(**inputs, return_dict=False)[0]
    return out


@pytest.fixture(scope="module")
def kiln(tiny_model_path: Path, folders: LoraFolders, unet_inputs: dict[str, Any]) -> Iterator[Any]:
    """The tiny UNet with per-row layers, its base output, and a 3-slot adapter stack."""
    unet = tiny_unet(tiny_model_path)
    base = _run(unet, unet_inputs)
    layers = install_row_lora(unet)
    stack = AdapterStack(layers, capacity=3, max_rank=MAX_RANK)
    for name in ("one", "two", "kohya"):
        stack.load(read_lora_file(folders.resolve(name), max_rank=MAX_RANK, name=name))
    yield unet, stack, base


@pytest.fixture(scope="module")
def reference(tiny_model_path: Path, lora_files: dict[str, Made]) -> Any:
    """diffusers' SDXL pipeline with `one`, `two` and `kohya` loaded by load_lora_weights."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_path)
    for name, made in lora_files.items():
        pipe.load_lora_weights(str(made.path), adapter_name=name)
    return pipe


def _diffusers_row(
    pipe: Any, inputs: dict[str, Any], names: list[str], weights: list[float]
) -> torch.Tensor:
    pipe.set_adapters(names, weights)
    return _run(pipe.unet, inputs)


def test_mixed_rows_equal_diffusers_row_by_row(
    kiln: Any, reference: Any, unet_inputs: dict[str, Any]
) -> None:
    unet, stack, base = kiln
    rows = [
        [LoraUse("one", 1.0)],
        [LoraUse("two", 0.5)],
        [],
        [LoraUse("one", 0.0)],
        [LoraUse("one", 1.0), LoraUse("two", 0.5)],
    ]
    stack.assign(rows)
    try:
        out = _run(unet, unet_inputs)
    finally:
        stack.clear()
    cases = {
        0: (["one"], [1.0]),
        1: (["two"], [0.5]),
        3: (["one"], [0.0]),
        4: (["one", "two"], [1.0, 0.5]),
    }
    for row, (names, weights) in cases.items():
        expected = _diffusers_row(reference, unet_inputs, names, weights)[row]
        difference = (out[row] - expected).abs().max().item()
        assert difference <= TOLERANCE, (row, difference)
    # The LoRAs change the output (the comparison is not vacuous).
    assert (out[0] - base[0]).abs().max().item() > 100 * TOLERANCE
    assert (out[1] - base[1]).abs().max().item() > 100 * TOLERANCE
    # No LoRA and scale 0: the base UNet's bytes.
    assert out[2].numpy().tobytes() == base[2].numpy().tobytes()
    assert out[3].numpy().tobytes() == base[3].numpy().tobytes()


def test_kohya_file_equals_diffusers_loading_it(
    kiln: Any, reference: Any, unet_inputs: dict[str, Any], lora_files: dict[str, Made]
) -> None:
    unet, stack, base = kiln
    weights = read_lora_file(lora_files["kohya"].path, max_rank=MAX_RANK, name="kohya")
    assert weights.source_format == "kohya"
    assert weights.unet[CONV_MODULE].is_conv
    assert weights.unet[CONV_MODULE].scale == pytest.approx(2.0 / 4)
    stack.assign([[LoraUse("kohya", 0.8)]] * 3 + [[], [LoraUse("kohya", 0.0)]])
    try:
        out = _run(unet, unet_inputs)
    finally:
        stack.clear()
    expected = _diffusers_row(reference, unet_inputs, ["kohya"], [0.8])
    difference = (out[:3] - expected[:3]).abs().max().item()
    assert difference <= TOLERANCE, difference
    assert isinstance(stack.layers[CONV_MODULE], RowLoraConv2d)
    assert (out[0] - base[0]).abs().max().item() > 100 * TOLERANCE
    assert out[3:].numpy().tobytes() == base[3:].numpy().tobytes()


def test_peft_file_reads_with_peft_scale_and_weights(lora_files: dict[str, Made]) -> None:
    one = lora_files["one"]
    weights = read_lora_file(one.path, max_rank=MAX_RANK)
    assert weights.source_format == "diffusers"
    assert weights.rank == 4
    assert set(weights.unet) == set(one.modules)
    for module, (down, up) in one.modules.items():
        assert torch.equal(weights.unet[module].down, down)
        assert torch.equal(weights.unet[module].up, up)
        assert weights.unet[module].scale == pytest.approx(8 / 4)
    assert weights.text_encoders == {}


def test_text_encoder_weights_are_kept_apart(tmp_path: Path) -> None:
    tensors = {}
    for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
        key = f"lora_te1_text_model_encoder_layers_0_self_attn_{projection}"
        tensors[f"{key}.lora_down.weight"] = torch.ones(2, 32)
        tensors[f"{key}.lora_up.weight"] = torch.ones(32, 2)
        tensors[f"{key}.alpha"] = torch.tensor(1.0)
    unet_key = "lora_unet_down_blocks_1_attentions_0_proj_in"
    tensors[f"{unet_key}.lora_down.weight"] = torch.ones(2, 64)
    tensors[f"{unet_key}.lora_up.weight"] = torch.ones(64, 2)
    tensors[f"{unet_key}.alpha"] = torch.tensor(2.0)
    weights = read_lora_file(_write(tmp_path / "te.safetensors", tensors), max_rank=MAX_RANK)
    assert list(weights.unet) == ["down_blocks.1.attentions.0.proj_in"]
    assert weights.unet["down_blocks.1.attentions.0.proj_in"].scale == pytest.approx(1.0)
    encoder = weights.text_encoders["text_encoder"]
    prefix = "encoder.layers.0.self_attn."  # named without CLIP's `text_model.` level
    assert sorted(encoder) == [prefix + p for p in ("k_proj", "out_proj", "q_proj", "v_proj")]
    assert encoder[prefix + "q_proj"].scale == pytest.approx(0.5)
    assert encoder[prefix + "q_proj"].down.shape == (2, 32)
    assert "text_encoder_2" not in weights.text_encoders


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


REFUSED_FILES = {
    "LoHa": {
        "lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_a": torch.zeros(4, 4),
        "lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_b": torch.zeros(4, 4),
    },
    "LoKr": {"lora_unet_down_blocks_1_attentions_0_proj_in.lokr_w1": torch.zeros(4, 4)},
    "DoRA": {
        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 64),
        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": torch.zeros(64, 2),
        "lora_unet_down_blocks_1_attentions_0_proj_in.dora_scale": torch.zeros(64, 1),
    },
}


@pytest.mark.parametrize("kind", sorted(REFUSED_FILES))
def test_loha_lokr_and_dora_files_are_refused_naming_the_file(kind: str, tmp_path: Path) -> None:
    path = _write(tmp_path / f"{kind.lower()}.safetensors", REFUSED_FILES[kind])
    with pytest.raises(LoraRefused, match=rf"^loras: {kind.lower()}\.safetensors: .*{kind}"):
        read_lora_file(path, max_rank=MAX_RANK)


def test_peft_dora_keys_are_refused(tmp_path: Path) -> None:
    module = "unet.down_blocks.1.attentions.0.proj_in"
    path = _write(
        tmp_path / "dora-peft.safetensors",
        {
            f"{module}.lora_A.weight": torch.zeros(2, 64),
            f"{module}.lora_B.weight": torch.zeros(64, 2),
            f"{module}.lora_magnitude_vector": torch.ones(64),
        },
    )
    with pytest.raises(LoraRefused, match=r"dora-peft\.safetensors: it is a DoRA file"):
        read_lora_file(path, max_rank=MAX_RANK)


def test_rank_above_maximum_is_refused(lora_files: dict[str, Made], kiln: Any) -> None:
    with pytest.raises(
        LoraRefused, match=r"loras: one: its rank 4 is above the maximum LoRA rank 2"
    ):
        read_lora_file(lora_files["one"].path, max_rank=2, name="one")
    weights = read_lora_file(lora_files["one"].path, max_rank=MAX_RANK, name="one-again")
    small = AdapterStack(kiln[1].layers, capacity=1, max_rank=2)
    with pytest.raises(LoraRefused, match="rank 4 is above the maximum LoRA rank 2"):
        small.check(weights)


def test_not_a_lora_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"not safetensors at all")
    with pytest.raises(LoraRefused, match=r"junk\.safetensors: not a readable \.safetensors file"):
        read_lora_file(path, max_rank=MAX_RANK)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("sub/one", "without a path separator"),
        ("..", r"may not contain '\.\.'"),
        ("..one", r"may not contain '\.\.'"),
        ("/etc/passwd", "without a path separator"),
        ("outside", "no such LoRA file"),
        ("missing", "no such LoRA file"),
        ("folder", "no such LoRA file"),
        ("escape", "links outside the LoRA folders"),
        ("", "1 to 255 characters"),
    ],
)
def test_names_outside_the_folders_are_refused_without_opening_them(
    name: str, reason: str, tmp_path: Path, lora_files: dict[str, Made], monkeypatch: Any
) -> None:
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "folder.safetensors").mkdir()
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(lora_files["one"].path.read_bytes())
    (folder / "escape.safetensors").symlink_to(outside)
    (folder / "sub").mkdir()
    (folder / "sub" / "one.safetensors").write_bytes(b"")
    opened = record_opens(monkeypatch)
    with pytest.raises(LoraNotFound, match=rf"^loras: .*{reason}"):
        LoraFolders.of([folder]).resolve(name)
    assert opened == []


def test_resolve_finds_names_with_or_without_suffix(folders: LoraFolders) -> None:
    assert folders.resolve("one").name == "one.safetensors"
    assert folders.resolve("two.safetensors").name == "two.safetensors"
    assert folders.names() == ["kohya", "one", "two"]


def _fresh_output(
    model: Path, weights: LoraWeights, inputs: dict[str, Any], scale: float
) -> torch.Tensor:
    unet = tiny_unet(model)
    stack = AdapterStack(install_row_lora(unet), capacity=1, max_rank=MAX_RANK)
    stack.load(weights)
    stack.assign([[LoraUse(weights.name, scale)]] * 5)
    return _run(unet, inputs)


def test_lru_evicts_least_recently_used_not_in_use_and_leaves_no_residue(
    tiny_model_path: Path, folders: LoraFolders, unet_inputs: dict[str, Any]
) -> None:
    read = {
        name: read_lora_file(folders.resolve(name), max_rank=MAX_RANK, name=name)
        for name in ("one", "two", "kohya")
    }
    unet = tiny_unet(tiny_model_path)
    stack = AdapterStack(install_row_lora(unet), capacity=2, max_rank=MAX_RANK)
    kohya_slot = stack.load(read["kohya"])
    stack.load(read["two"])
    memory = stack.memory_bytes()
    stack.assign([[LoraUse("kohya")]] * 5)  # the running batch uses kohya, the LRU one
    slot = stack.load(read["one"])
    assert stack.resident == ["kohya", "one"]  # two was evicted: kohya is in use
    stack.clear()
    stack.slot_of("one")  # one is now the most recently used
    assert stack.load(read["two"]) == kohya_slot  # kohya, least recently used, goes
    assert stack.resident == ["one", "two"]
    with pytest.raises(StackFull, match="loras: kohya: all 2 LoRA slots"):
        stack.load(read["kohya"], in_use={"one", "two"})
    # The slots reused by one (was two's) and two (was kohya's, with a conv layer) hold
    # exactly their own adapter: the output equals a stack that never held another.
    for name in ("one", "two"):
        stack.assign([[LoraUse(name, 0.7)]] * 5)
        out = _run(unet, unet_inputs)
        expected = _fresh_output(tiny_model_path, read[name], unet_inputs, 0.7)
        assert torch.equal(out, expected), name
    assert slot != kohya_slot
    # Memory stays that of the slots, whatever the number of distinct LoRAs loaded.
    for _ in range(2):
        for name in ("kohya", "one", "two"):
            stack.clear()
            stack.load(read[name])
    assert stack.memory_bytes() == memory


def test_unknown_resident_name_and_wrong_batch_size_are_errors(kiln: Any) -> None:
    unet, stack, _ = kiln
    with pytest.raises(KeyError, match="not resident"):
        stack.assign([[LoraUse("nobody")]])
    stack.assign([[LoraUse("one")]] * 2)
    try:
        with pytest.raises(ValueError, match="assignment is for 2 rows"):
            _run(
                unet,
                {
                    "sample": torch.zeros(1, 4, 8, 8),
                    "timestep": torch.tensor([1.0]),
                    "encoder_hidden_states": torch.zeros(1, 77, 64),
                    "added_cond_kwargs": {
                        "text_embeds": torch.zeros(1, 32),
                        "time_ids": torch.zeros(1, 6),
                    },
                },
            )
    finally:
        stack.clear()
