"""Single-file SDXL checkpoints (original Stability/A1111 layout) as served models.

The checkpoint is made from the shipped kiln-shapes folder with Kiln's own converter, and
served with kiln-shapes as its config folder: it must give the folder model's exact image
bytes (the conversion is lossless), keep its own name, defaults and limits, never reach a
network, and refuse every bad input with the file and the fix named.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from e2e_support import decode, generate, images, open_stub, png_parameters, request
from safetensors.torch import load_file, save_file

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_server.models.loader import model_content_hash, read_model_files
from kiln_server.models.original_layout import UNET_PREFIX, VAE_PREFIX
from kiln_server.models.original_layout import main as convert_main
from kiln_server.models.registry import REPO_ROOT, ModelRegistry, RegistryError

SHAPES = REPO_ROOT / "models" / "kiln-shapes"
TUNED_BIAS = UNET_PREFIX + "out.2.bias"


@dataclass(frozen=True)
class Checkpoints:
    """Original-layout files made from kiln-shapes in one temporary folder."""

    folder: Path
    base: Path  # kiln-shapes, converted losslessly (its weights are fp16)
    tuned: Path  # the same architecture with other weights: a "fine-tune"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    folder = tmp_path_factory.mktemp("checkpoints")
    base = folder / "shapes.safetensors"
    assert convert_main([str(SHAPES), str(base)]) == 0
    state = load_file(str(base))
    state[TUNED_BIAS] = state[TUNED_BIAS] + 0.25
    save_file(state, str(folder / "tuned.safetensors"))
    return Checkpoints(folder, base, folder / "tuned.safetensors")


def library_config(checkpoints: Checkpoints) -> str:
    """kiln-shapes as a single file, and a fine-tune of it with its own defaults."""
    return f"""
[[models]]
name = "shapes-file"
checkpoint = "{checkpoints.base}"
config_folder = "{SHAPES}"
default_num_inference_steps = 3

[[models]]
name = "shapes-tuned"
checkpoint = "tuned.safetensors"
config_folder = "{SHAPES}"
description = "kiln-shapes with a brighter UNet output"
default_num_inference_steps = 4
default_guidance_scale = 3.5
max_size = 128
"""


def registry_of(entries: list[dict[str, Any]], base: Path) -> ModelRegistry:
    return ModelRegistry.from_config({"models": entries, "_config_dir": str(base)}, base / "cache")


@pytest.fixture(scope="module")
def folder_model(checkpoints: Checkpoints) -> Any:
    """kiln-shapes served from its diffusers folder (torch backend): the reference."""
    from kiln_server.runtime import load_model

    registry = registry_of([{"name": "shapes", "path": str(SHAPES)}], checkpoints.folder)
    return load_model(registry.models["shapes"], "torch", None)


def folder_pixels(folder_model: Any, prompt: str, **overrides: Any) -> np.ndarray:
    params = folder_model.spec.default_request(prompt, **overrides)
    return folder_model.pipeline.generate(params)[0]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def network_weights(folder: str, names: list[str]) -> list[str]:
    """shutil.copytree's ignore: the weight files of the four networks a checkpoint replaces."""
    networks = ("unet", "vae", "text_encoder", "text_encoder_2")
    return [n for n in names if Path(folder).name in networks and n.endswith(".safetensors")]


def test_checkpoint_model_generates_the_folder_models_pixels_offline(
    checkpoints: Checkpoints, folder_model: Any, no_network: None, tmp_path: Path
) -> None:
    from kiln_server.runtime import load_model

    # A config folder without network weights: the checkpoint's are the only ones read.
    config_folder = tmp_path / "configs-only"
    shutil.copytree(SHAPES, config_folder, ignore=network_weights)
    entry = {"name": "file", "checkpoint": str(checkpoints.base), "config_folder": "configs-only"}
    model = load_model(registry_of([entry], tmp_path).models["file"], "torch", None)
    params = model.spec.default_request("a red circle", num_inference_steps=3, seed=11)

    assert np.array_equal(
        model.pipeline.generate(params)[0],
        folder_pixels(folder_model, "a red circle", num_inference_steps=3, seed=11),
    )


def test_converter_round_trips_every_tensor_exactly(checkpoints: Checkpoints) -> None:
    from kiln_server.models.loader import load_modules

    folder = load_modules(SHAPES)
    single = load_modules(SHAPES, checkpoint=checkpoints.base)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        expected = getattr(folder, name).state_dict()
        loaded = getattr(single, name).state_dict()
        assert loaded.keys() == expected.keys(), name
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), name


def test_checkpoint_model_reads_the_config_folders_files(checkpoints: Checkpoints) -> None:
    folder = read_model_files(SHAPES)
    single = read_model_files(SHAPES, checkpoint=checkpoints.tuned)

    assert single.dims == folder.dims
    assert single.scheduler_config == folder.scheduler_config
    assert single.preview_decoder_path == folder.preview_decoder_path
    assert single.source == checkpoints.tuned and folder.source == SHAPES


def test_content_hash_follows_the_checkpoint_not_the_config_folders_weights(
    checkpoints: Checkpoints, tmp_path: Path
) -> None:
    config_folder = tmp_path / "config"
    shutil.copytree(SHAPES, config_folder)
    hashes = tmp_path / "hashes.json"

    def content_hash(checkpoint: Path) -> str:
        return model_content_hash(config_folder, hashes, checkpoint=checkpoint)

    base = content_hash(checkpoints.base)
    assert base == content_hash(checkpoints.base)  # remembered, and the same
    assert base != content_hash(checkpoints.tuned)
    assert base != model_content_hash(config_folder, hashes)
    # The networks' weights in the config folder are not what is served.
    (config_folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"other")
    assert content_hash(checkpoints.base) == base
    # Its configs are.
    scheduler = config_folder / "scheduler" / "scheduler_config.json"
    scheduler.write_text(scheduler.read_text().replace("}", ', "steps_offset": 1}', 1))
    assert content_hash(checkpoints.base) != base


@pytest.fixture(scope="module")
def library_server(
    checkpoints: Checkpoints, tmp_path_factory: pytest.TempPathFactory, kiln_cache_dir: Path
) -> Iterator[Any]:
    from conftest import start_server

    config = library_config(checkpoints)
    workdir = checkpoints.folder  # the config's relative `checkpoint` resolves here
    server = start_server(workdir, kiln_cache_dir, "--backend", "torch", config=config)
    yield server
    server.terminate()


def test_server_lists_checkpoint_models_with_their_own_defaults(library_server: Any) -> None:
    with open_stub(library_server.address) as stub:
        listed = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models}

    assert list(listed) == ["shapes-file", "shapes-tuned"]
    tuned = listed["shapes-tuned"]
    # The entry's own settings, then the config folder's kiln.json (64x64, min 64).
    assert tuned.description == "kiln-shapes with a brighter UNet output"
    assert tuned.default_num_inference_steps == 4
    assert tuned.default_guidance_scale == 3.5
    assert tuned.max_size == 128
    assert (tuned.default_width, tuned.default_height, tuned.min_size) == (64, 64, 64)
    assert listed["shapes-file"].max_size == 256  # kiln.json's
    assert tuned.backend == "torch" and tuned.max_prompt_tokens == 77


def test_server_generates_with_each_checkpoints_own_weights(
    library_server: Any, folder_model: Any
) -> None:
    pixels = {}
    with open_stub(library_server.address) as stub:
        for model in ("shapes-file", "shapes-tuned"):
            message = request(
                "a blue square", model=model, seed=5, num_inference_steps=3, guidance_scale=5.0
            )
            image = images(generate(stub, message))[0]
            assert png_parameters(image.data)["model"] == model
            pixels[model] = np.asarray(decode(image.data))
    expected = folder_pixels(
        folder_model, "a blue square", seed=5, num_inference_steps=3, guidance_scale=5.0
    )

    # Same pixels as the folder model (the PNGs differ only in the model name they carry).
    assert np.array_equal(pixels["shapes-file"], expected)
    # The fine-tune's own weights are served, not its config folder's.
    assert not np.array_equal(pixels["shapes-tuned"], expected)


# --- bad inputs: each refused at config load with the file and the fix -----------------------


def _write_partial(path: Path, source: Path, keep: str) -> Path:
    save_file({k: v for k, v in load_file(str(source)).items() if k.startswith(keep)}, str(path))
    return path


def _write_reshaped(path: Path, source: Path, key: str, shape: tuple[int, ...]) -> Path:
    state = load_file(str(source))
    state[key] = torch.zeros(shape, dtype=state[key].dtype)
    save_file(state, str(path))
    return path


BAD_ENTRIES = {
    "missing file": (
        lambda c: {"checkpoint": "absent.safetensors", "config_folder": str(SHAPES)},
        ["absent.safetensors does not exist", "fix `checkpoint`"],
    ),
    "not safetensors": (
        lambda c: {
            "checkpoint": str(_text_file(c.folder / "model.ckpt")),
            "config_folder": str(SHAPES),
        },
        ["model.ckpt is not a safetensors file", "re-save the model in that format"],
    ),
    "diffusers layout": (
        lambda c: {
            "checkpoint": str(SHAPES / "unet" / "diffusion_pytorch_model.safetensors"),
            "config_folder": str(SHAPES),
        },
        [
            "diffusion_pytorch_model.safetensors is not in the original SDXL layout",
            "looks like diffusers-layout weights (key ",
            'serve a complete diffusers folder with `path = "FOLDER"`',
        ],
    ),
    "lora": (
        lambda c: {
            "checkpoint": str(SHAPES / "loras" / "closeup.safetensors"),
            "config_folder": str(SHAPES),
        },
        [
            "closeup.safetensors is not in the original SDXL layout",
            "looks like a LoRA",
            "lora_dirs",
        ],
    ),
    "stable diffusion 1.x": (
        lambda c: {
            "checkpoint": str(_write_sd15_like(c.folder / "sd15.safetensors")),
            "config_folder": str(SHAPES),
        },
        ["sd15.safetensors is a Stable Diffusion 1.x/2.x checkpoint", "not SDXL"],
    ),
    "unet only": (
        lambda c: {
            "checkpoint": str(_write_partial(c.folder / "unet.safetensors", c.base, UNET_PREFIX)),
            "config_folder": str(SHAPES),
        },
        ["unet.safetensors lacks vae (first_stage_model.*), text_encoder", "complete checkpoints"],
    ),
    "other shapes": (
        lambda c: {
            "checkpoint": str(
                _write_reshaped(
                    c.folder / "wide.safetensors",
                    c.base,
                    UNET_PREFIX + "out.2.weight",
                    (4, 64, 1, 1),
                )
            ),
            "config_folder": str(SHAPES),
        },
        [
            f"wide.safetensors: tensor {UNET_PREFIX}out.2.weight is [4, 64, 1, 1] but config "
            f"folder {SHAPES} expects [4, 64, 3, 3]",
            "point `config_folder` at the diffusers folder of the model it was made from",
        ],
    ),
    "missing config folder": (
        lambda c: {"checkpoint": str(c.base), "config_folder": "no-such-folder"},
        ["config_folder: model folder", "no-such-folder does not exist", "point `config_folder`"],
    ),
    "config folder not a model": (
        lambda c: {"checkpoint": str(c.base), "config_folder": str(c.folder)},
        ["has no model_index.json", "point `config_folder` at a local diffusers SDXL folder"],
    ),
    "no config folder": (
        lambda c: {"checkpoint": str(c.base)},
        ["`checkpoint` needs `config_folder`"],
    ),
    "checkpoint in path": (
        lambda c: {"path": str(c.base)},
        ["shapes.safetensors is a file", '`checkpoint = "FILE"`', '`config_folder = "FOLDER"`'],
    ),
    "config folder without checkpoint": (
        lambda c: {"path": str(SHAPES), "config_folder": str(SHAPES)},
        ["`config_folder` goes with `checkpoint`"],
    ),
}


def _write_sd15_like(path: Path) -> Path:
    names = [
        UNET_PREFIX + "input_blocks.0.0.weight",
        VAE_PREFIX + "encoder.conv_in.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    ]
    save_file({name: torch.zeros(2, 2) for name in names}, str(path))
    return path


def _text_file(path: Path) -> Path:
    path.write_text("PK\x03\x04 a pickled torch checkpoint, not safetensors")
    return path


@pytest.mark.parametrize(("entry", "expected"), BAD_ENTRIES.values(), ids=BAD_ENTRIES.keys())
def test_bad_checkpoint_entries_are_refused_naming_the_file_and_the_fix(
    checkpoints: Checkpoints, entry: Any, expected: list[str]
) -> None:
    with pytest.raises(RegistryError) as refused:
        registry_of([{"name": "broken", **entry(checkpoints)}], checkpoints.folder)

    message = str(refused.value)
    assert message.startswith("model 'broken': ")
    for part in expected:
        assert part in message


def test_kiln_serve_stops_with_exit_2_on_a_bad_checkpoint(checkpoints: Checkpoints) -> None:
    config = checkpoints.folder / "bad.toml"
    config.write_text(
        f'[[models]]\nname = "lora"\ncheckpoint = "{SHAPES / "loras" / "closeup.safetensors"}"\n'
        f'config_folder = "{SHAPES}"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "kiln_client.cli", "serve", "--port", "0", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 2, result.stderr
    assert "kiln serve: model 'lora': checkpoint " in result.stderr
    assert "looks like a LoRA" in result.stderr
    assert "Traceback" not in result.stderr


def test_converter_refuses_a_folder_that_is_not_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert convert_main([str(tmp_path), str(tmp_path / "out.safetensors")]) == 2
    assert f"{tmp_path} has no model_index.json" in capsys.readouterr().err


def test_written_checkpoint_has_the_original_vae_attention_shapes(checkpoints: Checkpoints) -> None:
    state = load_file(str(checkpoints.base))
    query = state[VAE_PREFIX + "decoder.mid.attn_1.q.weight"]
    assert query.shape == (64, 64, 1, 1)  # a 1x1 convolution, as in Stability's files


def test_layout_of_sdxl_base_is_the_one_diffusers_reads_back() -> None:
    """At SDXL base 1.0's full size (on the meta device): diffusers recognizes the written
    layout as SDXL base and converts every tensor back to its own name and shape."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        infer_diffusers_model_type,
    )

    from kiln_server.models.original_layout import TEXT_ENCODER_2_PREFIX, to_original_layout
    from kiln_server.models.sdxl_base_arch import meta_components

    modules = {component.subfolder: component.module for component in meta_components()}
    unet, vae = modules["unet"], modules["vae"]
    original = to_original_layout(unet, vae, modules["text_encoder"], modules["text_encoder_2"])

    assert infer_diffusers_model_type(original) == "xl_base"
    for key in ("input_blocks.3.0.op.weight", "output_blocks.2.2.conv.weight", "out.2.bias"):
        assert UNET_PREFIX + key in original
    # transformers' CLIPTextModel may or may not nest its weights under `text_model.`.
    flat = "text_model."
    back = {
        "unet": convert_ldm_unet_checkpoint(original, unet.config),
        "vae": convert_ldm_vae_checkpoint(original, vae.config),
        "text_encoder": {
            k.removeprefix(flat): v for k, v in convert_ldm_clip_checkpoint(original).items()
        },
        "text_encoder_2": convert_open_clip_checkpoint(
            modules["text_encoder_2"], original, prefix=TEXT_ENCODER_2_PREFIX
        ),
    }
    for name, state in back.items():
        expected = modules[name].state_dict()
        if name == "text_encoder":
            expected = {k.removeprefix(flat): v for k, v in expected.items()}
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        assert shapes == {k: tuple(v.shape) for k, v in expected.items()}, name


def test_build_engines_builds_a_checkpoint_model_from_its_checkpoint(
    checkpoints: Checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kiln build-engines --model NAME` hands the build the checkpoint and its config
    folder (run_build reads, hashes and exports it through the loader, like the server)."""
    import kiln_build.build
    from kiln_build.build import BuildOptions, BuildSummary
    from kiln_client.cli import main

    seen: list[BuildOptions] = []

    def fake_run_build(options: BuildOptions) -> BuildSummary:
        seen.append(options)
        return BuildSummary(manifest_path=options.out_dir / "manifest.json")

    monkeypatch.setattr(kiln_build.build, "run_build", fake_run_build)
    config = tmp_path / "kiln.toml"
    config.write_text(
        library_config(checkpoints).replace("tuned.safetensors", str(checkpoints.tuned))
    )
    out = tmp_path / "engines"
    command = ["build-engines", "--config", str(config), "--model", "shapes-tuned"]

    assert main([*command, "--out", str(out), "--quiet"]) == 0
    assert (seen[0].checkpoint, seen[0].model_path) == (checkpoints.tuned, SHAPES)
    assert seen[0].out_dir == out / "shapes-tuned"
