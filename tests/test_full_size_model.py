"""The full-size SDXL architecture model and the cached model content hash.

Nothing here materializes the 7 GB model: its architecture is checked on the `meta` device,
and the folder writer runs end to end on a scaled-down configuration.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kiln_server.models import loader, registry, sdxl_base_arch, tiny_sdxl
from kiln_server.models.loader import load_modules, model_content_hash, read_model_files
from kiln_server.models.sdxl_base_arch import (
    SDXL_BASE_ARCH_NAME,
    Architecture,
    Init,
    is_current,
    meta_components,
    parameter_inits,
    parameter_values,
    uniform_fp16,
    write_sdxl_base_arch,
)

# Parameter counts of stabilityai/stable-diffusion-xl-base-1.0's four networks.
SDXL_BASE_PARAMETERS = {
    "unet": 2_567_463_684,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
    "preview_decoder": 2_445_063,  # taesdxl's AutoencoderTiny, encoder included
}
SMALL_TEXT_ENCODER = {**tiny_sdxl.TEXT_ENCODER_CONFIG, "bos_token_id": 0, "eos_token_id": 2}
SMALL = Architecture(
    unet=dict(tiny_sdxl.UNET_CONFIG),
    vae=dict(tiny_sdxl.VAE_CONFIG),
    text_encoder=dict(SMALL_TEXT_ENCODER),
    text_encoder_2=dict(SMALL_TEXT_ENCODER),
)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scaled-down model written by the same writer as the full-size one."""
    folder = tmp_path_factory.mktemp("models") / SDXL_BASE_ARCH_NAME
    return write_sdxl_base_arch(folder, arch=SMALL, progress=False)


def test_architecture_matches_sdxl_base_parameter_counts() -> None:
    components = {c.subfolder: c for c in meta_components()}
    counts = {name: sum(p.numel() for p in c.module.parameters()) for name, c in components.items()}
    assert counts == SDXL_BASE_PARAMETERS
    assert all(p.is_meta for c in components.values() for p in c.module.parameters())
    for component in components.values():
        # Every tensor the checkpoint holds has a weight rule.
        assert set(parameter_inits(component.module)) == set(component.module.state_dict())
    total = sum(c.num_bytes for c in components.values())
    assert 6.9e9 < total < 7.0e9  # ~7 GB of fp16 weights


def test_unet_conditioning_is_sdxl_base() -> None:
    unet: Any = next(c.module for c in meta_components() if c.subfolder == "unet")
    assert unet.config.cross_attention_dim == 768 + 1280
    assert unet.config.projection_class_embeddings_input_dim == 1280 + 6 * 256
    assert unet.add_embedding.linear_1.in_features == 2816
    assert unet.config.sample_size * 8 == 1024


def _python_mix32(x: int) -> int:
    mask = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * sdxl_base_arch._MULTIPLIER_1) & mask
    x ^= x >> 15
    x = (x * sdxl_base_arch._MULTIPLIER_2) & mask
    return x ^ (x >> 16)


def test_uniform_values_are_exact_integer_hashes() -> None:
    """Matches arbitrary-precision Python arithmetic: no device-dependent overflow or rounding."""
    seed, bound = 0x0123456789ABCDEF, 0.5
    values = uniform_fp16(seed, 1000, bound)
    for index in (0, 1, 517, 999):
        bits = _python_mix32(_python_mix32(index ^ (seed & 0xFFFFFFFF)) ^ (seed >> 32))
        expected = torch.tensor(((bits >> 8) * 2.0 / (1 << 24) - 1.0) * bound)
        assert values[index] == expected.to(torch.float32).to(torch.float16)
    assert values.dtype == torch.float16 and values.device.type == "cpu"
    assert -bound <= float(values.min()) and float(values.max()) < bound


def test_weight_generator_is_deterministic_per_name() -> None:
    module = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 16), nn.LayerNorm(16))
    module.add_module("conv", nn.Conv2d(4, 8, 3))
    inits = parameter_inits(module)
    assert inits["1.weight"] == Init("uniform", 1 / 8**0.5)
    assert inits["conv.weight"] == inits["conv.bias"] == Init("uniform", 1 / 36**0.5)
    assert inits["0.weight"] == Init("uniform", 3**0.5)
    assert inits["2.weight"].kind == "ones" and inits["2.bias"].kind == "zeros"

    def generate(order: list[str]) -> dict[str, torch.Tensor]:
        shapes = {name: p.shape for name, p in module.named_parameters()}
        return {name: parameter_values("unet", name, shapes[name], inits[name]) for name in order}

    names = list(inits)
    first, reordered = generate(names), generate(names[::-1])
    for name in names:
        assert torch.equal(first[name], reordered[name])
        assert first[name].dtype == torch.float16
    # Other names, other components: other values.
    assert not torch.equal(
        first["1.weight"], parameter_values("vae", "1.weight", (16, 8), inits["1.weight"])
    )
    linear = first["1.weight"].float()
    assert abs(float(linear.std()) - (1 / 8**0.5) / 3**0.5) < 0.02
    embedding = parameter_values("t", "e", (4096, 64), Init("uniform", 3**0.5)).float()
    assert abs(float(embedding.std()) - 1.0) < 0.02 and abs(float(embedding.mean())) < 0.02


def test_an_unknown_layer_type_has_no_silent_rule() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(3))

    with pytest.raises(TypeError, match="gain"):
        parameter_inits(nn.Sequential(Scale()))


def test_written_folder_loads_through_the_loader(small_model: Path) -> None:
    assert is_current(small_model, SMALL)
    assert not is_current(small_model)  # the full-size architecture is another model
    files = read_model_files(small_model)
    assert files.dims.text_hidden_size == 32 and files.dims.num_time_ids == 6
    assert "noise" in files.kiln_config["description"]
    spec = registry.make_spec(SDXL_BASE_ARCH_NAME, small_model, {})
    assert (spec.default_width, spec.default_height) == (1024, 1024)
    assert spec.default_num_inference_steps == 30 and spec.default_guidance_scale == 5.0
    assert spec.default_scheduler == "K_EULER" and spec.max_num_outputs == 8

    modules = load_modules(small_model)
    inits = parameter_inits(modules.unet)
    weight = modules.unet.conv_in.weight
    expected = parameter_values("unet", "conv_in.weight", weight.shape, inits["conv_in.weight"])
    assert torch.equal(weight, expected.float())  # fp16 on disk, exact in fp32
    projection = modules.text_encoder_2.text_projection.weight
    assert projection.shape == (32, 32) and float(projection.abs().max()) > 0
    with torch.no_grad():
        latents = torch.randn(1, 4, 8, 8)
        text = torch.randn(1, 77, 64)
        added = {
            "text_embeds": torch.randn(1, 32),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
        }
        noise = modules.unet(latents, 999, text, added_cond_kwargs=added).sample
    assert noise.shape == latents.shape and bool(torch.isfinite(noise).all())


def test_ensure_generates_once_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sdxl_base_arch, "SDXL_BASE", SMALL)
    folder = sdxl_base_arch.ensure_sdxl_base_arch(tmp_path / "models")
    assert folder == tmp_path / "models" / SDXL_BASE_ARCH_NAME and is_current(folder, SMALL)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    written = weights.stat().st_mtime_ns

    def no_generation(*args: Any) -> Path:
        raise AssertionError("a current folder was generated again")

    monkeypatch.setattr(sdxl_base_arch, "write_sdxl_base_arch", no_generation)
    assert sdxl_base_arch.ensure_sdxl_base_arch(tmp_path / "models") == folder
    # New serving defaults: kiln.json is rewritten, the weights are kept.
    changed = replace(SMALL, kiln={**SMALL.kiln, "default_width": 768})
    monkeypatch.setattr(sdxl_base_arch, "SDXL_BASE", changed)
    sdxl_base_arch.ensure_sdxl_base_arch(tmp_path / "models")
    assert json.loads((folder / "kiln.json").read_text())["default_width"] == 768
    assert weights.stat().st_mtime_ns == written
    # Other weights or configs: generated again.
    other = replace(SMALL, vae={**SMALL.vae, "layers_per_block": 2})
    monkeypatch.setattr(sdxl_base_arch, "SDXL_BASE", other)
    with pytest.raises(AssertionError, match="generated again"):
        sdxl_base_arch.ensure_sdxl_base_arch(tmp_path / "models")


def test_safetensors_files_are_fp16(small_model: Path) -> None:
    from safetensors import safe_open

    for subfolder, name in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
        with safe_open(str(small_model / subfolder / f"{name}.safetensors"), "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            assert {handle.get_tensor(key).dtype for key in sorted(handle.keys())} == {
                torch.float16
            }


def test_registry_offers_the_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[Path] = []

    def fake_ensure(models_dir: Path) -> Path:
        calls.append(models_dir)
        return models_dir / "x"

    monkeypatch.setattr(registry, "ensure_sdxl_base_arch", fake_ensure)
    assert SDXL_BASE_ARCH_NAME in registry.BUILTIN_MODELS
    assert registry.builtin_model_path(SDXL_BASE_ARCH_NAME, tmp_path) == tmp_path / "models/x"
    assert calls == [tmp_path / "models"]


# The content hash as defined before it was cached: engine manifests already record it.
def _uncached_reference_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel.startswith(".") or rel == "kiln.json":
            continue
        digest.update(rel.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def hashed_folder(tmp_path: Path) -> Path:
    """A small model-like folder whose files are old enough for the hash to be cached."""
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "weights.bin").write_bytes(os.urandom(3 << 20))
    (folder / "unet" / "config.json").write_text('{"a": 1}')
    (folder / "model_index.json").write_text("{}")
    (folder / "kiln.json").write_text("{}")
    (folder / ".hidden").write_text("not hashed")
    _age(folder)
    return folder


def _age(folder: Path) -> None:
    old = 1_700_000_000_000_000_000
    for file in folder.rglob("*"):
        os.utime(file, ns=(old, old))


def _count_opens(monkeypatch: pytest.MonkeyPatch, folder: Path) -> list[Path]:
    opened: list[Path] = []
    original = Path.open

    def counting_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self.is_relative_to(folder):
            opened.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", counting_open)
    return opened


def test_cached_hash_equals_uncached_hash(
    hashed_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "kiln"))
    cache = tmp_path / "cache" / "hashes.json"
    uncached = model_content_hash(hashed_folder, use_cache=False)
    assert uncached == _uncached_reference_hash(hashed_folder)
    assert model_content_hash(hashed_folder, cache) == uncached  # miss: hashes and stores
    assert cache.is_file()
    assert model_content_hash(hashed_folder, cache) == uncached  # hit
    assert model_content_hash(hashed_folder) == uncached  # default signature, default cache


def test_cache_hit_reads_no_model_file(
    hashed_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hashes.json"
    expected = model_content_hash(hashed_folder, cache)
    opened = _count_opens(monkeypatch, hashed_folder)
    assert model_content_hash(hashed_folder, cache) == expected
    assert opened == []
    model_content_hash(hashed_folder, use_cache=False)
    assert len(opened) == 3


def test_a_changed_file_is_rehashed(
    hashed_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hashes.json"
    before = model_content_hash(hashed_folder, cache)
    weights = hashed_folder / "unet" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[12345] ^= 0xFF  # same size, new content and mtime
    weights.write_bytes(bytes(data))
    after = model_content_hash(hashed_folder, cache)
    assert after != before
    assert after == _uncached_reference_hash(hashed_folder)
    # A just-written file is not remembered (its mtime could hide a further change) ...
    opened = _count_opens(monkeypatch, hashed_folder)
    assert model_content_hash(hashed_folder, cache) == after and opened
    # ... until it is older than the timestamp granularity.
    _age(hashed_folder)
    os.utime(weights, ns=(1_700_000_000_000_000_001,) * 2)
    assert model_content_hash(hashed_folder, cache) == after
    opened.clear()
    assert model_content_hash(hashed_folder, cache) == after and opened == []
    (hashed_folder / "unet" / "extra.json").write_text("{}")
    assert model_content_hash(hashed_folder, cache) != after  # an added file counts too


def test_corrupt_cache_is_ignored_and_rewritten(hashed_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hashes.json"
    cache.write_text("{not json")
    expected = _uncached_reference_hash(hashed_folder)
    assert model_content_hash(hashed_folder, cache) == expected
    data = json.loads(cache.read_text())
    assert data["folders"][str(hashed_folder.resolve())]["sha256"] == expected
    entry = data["folders"][str(hashed_folder.resolve())]
    entry["sha256"] = 12  # a malformed entry is a miss, not an answer
    cache.write_text(json.dumps(data))
    assert model_content_hash(hashed_folder, cache) == expected


def test_default_cache_lives_in_the_kiln_cache_dir(
    hashed_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "kiln"))
    assert loader.default_hash_cache_file() == tmp_path / "kiln" / loader.HASH_CACHE_FILE_NAME
    model_content_hash(hashed_folder)
    assert (tmp_path / "kiln" / loader.HASH_CACHE_FILE_NAME).is_file()


def test_unwritable_cache_still_hashes(hashed_folder: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    expected = _uncached_reference_hash(hashed_folder)
    assert model_content_hash(hashed_folder, blocker / "hashes.json") == expected


def test_listmodels_says_the_benchmark_model_draws_noise(small_model: Path) -> None:
    """Its kiln.json description reaches the served spec (ListModels' `description`)."""
    from kiln_server.models.registry import make_spec

    spec = make_spec(SDXL_BASE_ARCH_NAME, small_model, {})
    assert "draws noise" in spec.description
    assert (spec.default_width, spec.default_num_inference_steps) == (1024, 30)
