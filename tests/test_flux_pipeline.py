"""Kiln's FLUX pipeline against diffusers' FluxPipeline, its loader, declarations and errors.

The reference is diffusers' FluxPipeline loaded with `from_pretrained(local_files_only=True)`
from the same tiny folder (so the folder is proven loadable by diffusers too), Kiln's side
goes through its own FLUX loader and torch engines. A request run alone equals diffusers
exactly (CPU fp32, same operations in the same order). Two places cannot be bit-exact and
are compared within stated tolerances: rows of different requests in one transformer
call (batched matrix products round differently from single-row ones: ~5e-7 on the
latents) and true CFG, where Kiln stacks the negative and positive rows in one call and
diffusers makes two calls.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kiln_server.engines.components import ShapeRequest, vae_decoder_spec
from kiln_server.engines.flux_components import FluxDims, flux_component_specs
from kiln_server.engines.flux_torch import load_flux_torch_engines
from kiln_server.engines.torch_engine import TorchEngine
from kiln_server.models.family import model_family
from kiln_server.models.flux_loader import (
    ModelFolderError,
    load_flux_modules,
    read_flux_model_files,
)
from kiln_server.models.t5_vocabulary import project_t5_tokenizer
from kiln_server.models.tiny_flux import T5_TOKENS, ensure_tiny_flux, t5_words
from kiln_server.pipeline.flux import (
    FluxDenoiseState,
    FluxPipeline,
    latent_image_ids,
    pack_latents,
    unpack_latents,
)
from kiln_server.pipeline.flux_previews import fit_latent_rgb
from kiln_server.pipeline.flux_reference import FluxDiffusersReference
from kiln_server.pipeline.flux_schedulers import make_flux_scheduler
from kiln_server.pipeline.params import GenerationParams, ImageConditioning, PreviewParams

PROMPT = "a red circle on a blue background"
# Latent tolerance for a request's rows batched with other requests' rows (measured ~5e-7).
BATCHED_LATENT_TOLERANCE = 1e-5


@dataclass
class Variant:
    """One tiny FLUX model loaded both ways."""

    path: Path
    pipeline: FluxPipeline
    reference: FluxDiffusersReference


@pytest.fixture(scope="module")
def flux_cache(kiln_cache_dir: Path) -> Path:
    return kiln_cache_dir / "models"


def _variant(cache: Path, guidance: bool) -> Variant:
    path = ensure_tiny_flux(cache, guidance=guidance)
    files = read_flux_model_files(path)
    engines = load_flux_torch_engines(load_flux_modules(path), files.dims)
    return Variant(
        path, FluxPipeline(files, engines), FluxDiffusersReference(path, files.max_sequence_length)
    )


@pytest.fixture(scope="module")
def dev(flux_cache: Path) -> Variant:
    """Dev-style tiny model: distilled guidance embedding, dynamic-shift scheduler."""
    return _variant(flux_cache, guidance=True)


@pytest.fixture(scope="module")
def schnell(flux_cache: Path) -> Variant:
    """Schnell-style tiny model: no guidance embedding, static-shift scheduler."""
    return _variant(flux_cache, guidance=False)


@pytest.fixture(params=["dev", "schnell"])
def variant(request: pytest.FixtureRequest) -> Variant:
    variant: Variant = request.getfixturevalue(request.param)
    return variant


def level_difference(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def params(**overrides: Any) -> GenerationParams:
    values: dict[str, Any] = {
        "prompt": PROMPT,
        "num_inference_steps": 4,
        "guidance_scale": 3.5,
        "scheduler": "FLOW_MATCH_EULER",
    }
    return GenerationParams(**{**values, **overrides})


# Two sizes with different token counts (16 and 48), so a dynamic shift differs.
SIZES = {"64x64": (64, 64), "96x128": (96, 128)}


@pytest.mark.parametrize("seed", [1, 1234])
@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_matches_diffusers(variant: Variant, size: tuple[int, int], seed: int) -> None:
    width, height = size
    request = params(width=width, height=height, seed=seed, num_outputs=2)
    ours = np.stack(variant.pipeline.generate(request))
    theirs = variant.reference.generate(request)
    assert ours.shape == (2, height, width, 3)
    assert ours.std() > 1.0, "the tiny model draws more than a flat image"
    assert np.array_equal(ours, theirs)


def _photo(width: int, height: int) -> np.ndarray:
    """A photo with structure: a gradient and a square, uint8 RGB."""
    rows, columns = np.mgrid[0:height, 0:width]
    photo = np.stack([rows * 255 // height, columns * 255 // width, np.full_like(rows, 90)], -1)
    photo[height // 4 : height // 2, width // 4 : width // 2] = (250, 30, 30)
    return photo.astype(np.uint8)


@pytest.mark.parametrize("strength", [0.3, 0.6, 1.0])
def test_img2img_matches_diffusers(variant: Variant, strength: float) -> None:
    """Image-to-image equals diffusers' FluxImg2ImgPipeline on the same components within
    1 level (measured: equal at strength 1; at 0.3 one level on 0.004% of pixels, float
    rounding on the photo's path), and starts where it does (4 steps at 0.6 run 3: the
    start rounds down, unlike SDXL's)."""
    width, height = SIZES["96x128"]
    photo = ImageConditioning(_photo(width, height), strength)
    request = params(width=width, height=height, seed=7, num_outputs=2, image=photo)
    ours = np.stack(variant.pipeline.generate(request))
    theirs = variant.reference.generate(request)
    assert level_difference(ours, theirs) <= 1
    state = variant.pipeline.prepare(request)
    assert state.total_steps == {0.3: 2, 0.6: 3, 1.0: 4}[strength]


def test_img2img_keeps_the_photo_at_low_strength(dev: Variant) -> None:
    width, height = SIZES["64x64"]
    photo = _photo(width, height)
    low = dev.pipeline.generate(params(seed=3, image=ImageConditioning(photo, 0.05)))[0]
    high = dev.pipeline.generate(params(seed=3, image=ImageConditioning(photo, 1.0)))[0]
    assert level_difference(low, photo) < level_difference(high, photo)


def test_distilled_guidance_changes_the_image(dev: Variant) -> None:
    low = np.stack(dev.pipeline.generate(params(guidance_scale=1.0)))
    high = np.stack(dev.pipeline.generate(params(guidance_scale=6.0)))
    assert not np.array_equal(low, high)
    assert np.array_equal(high, dev.reference.generate(params(guidance_scale=6.0)))


def test_true_cfg_matches_diffusers(schnell: Variant) -> None:
    """Schnell-style with a negative prompt: diffusers' true_cfg_scale = guidance_scale.
    Kiln's negative and positive rows share one call; diffusers makes two: 1 level."""
    request = params(negative_prompt="blurry", guidance_scale=4.0, num_outputs=2, seed=5)
    assert schnell.pipeline.rows_for(request) == 4
    ours = np.stack(schnell.pipeline.generate(request))
    assert level_difference(ours, schnell.reference.generate(request)) <= 1
    plain = np.stack(schnell.pipeline.generate(params(num_outputs=2, seed=5)))
    assert not np.array_equal(ours, plain)


def test_schedule_shift_per_image_size(dev: Variant, schnell: Variant) -> None:
    """Dynamic shifting (dev) depends on the request's token count; static (schnell) not."""

    def sigmas(variant: Variant, tokens: int) -> list[float]:
        config = variant.pipeline.files.scheduler_config
        scheduler = make_flux_scheduler("FLOW_MATCH_EULER", config, 4, tokens)
        return [float(s) for s in scheduler.sigmas]

    # diffusers' values for FLUX.1-dev's config at 16 tokens (mu = 0.459375).
    assert sigmas(dev, 16) == pytest.approx([1.0, 0.82606, 0.61287, 0.34542, 0.0], abs=1e-5)
    assert sigmas(dev, 16) != sigmas(dev, 48)
    assert sigmas(schnell, 16) == sigmas(schnell, 48)
    assert sigmas(schnell, 16) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def _run_batched(pipeline: FluxPipeline, requests: list[tuple[GenerationParams, int]]) -> list[Any]:
    """Step requests as the batcher does: request i joins after `start` steps of the
    others; every step, states of one image size share one transformer call. Returns the
    states in request order, each finished."""
    states: list[FluxDenoiseState | None] = [None] * len(requests)
    mixed_steps = 0
    tick = 0
    while any(s is None or not s.finished for s in states):
        for i, (request, start) in enumerate(requests):
            if states[i] is None and tick >= start:
                states[i] = pipeline.prepare(request)
        active = [s for s in states if s is not None and not s.finished]
        groups: dict[tuple[int, int], list[FluxDenoiseState]] = {}
        for state in active:
            groups.setdefault((state.params.height, state.params.width), []).append(state)
        for group in groups.values():
            if len({s.step_index for s in group}) > 1:
                mixed_steps += 1
            result = pipeline.denoise_step(group)
            assert result.rows == sum(s.rows for s in group)
        tick += 1
    assert mixed_steps > 0, "some call must carry rows at different timesteps"
    return states


def test_batch_equals_solo_runs(dev: Variant) -> None:
    """Requests at different steps and sizes, batched: each gets its solo result."""
    requests = [
        (params(seed=1, num_inference_steps=5), 0),
        (params(prompt="a green square", seed=2, guidance_scale=5.0, num_outputs=2), 2),
        (params(seed=3, width=96, height=48, num_inference_steps=3), 1),
        (params(seed=4, width=96, height=48, num_inference_steps=3), 0),
    ]
    batched = _run_batched(dev.pipeline, requests)
    for (request, _), state in zip(requests, batched, strict=True):
        solo = dev.pipeline.prepare(request)
        while not solo.finished:
            dev.pipeline.denoise_step([solo])
        difference = (state.latents - solo.latents).abs().max().item()
        assert difference <= BATCHED_LATENT_TOLERANCE
        images = dev.pipeline.decode(state).numpy()
        assert level_difference(images, dev.pipeline.decode(solo).numpy()) <= 1


def test_true_cfg_rows_batch_with_plain_rows(schnell: Variant) -> None:
    requests = [
        (params(seed=1, negative_prompt="", guidance_scale=3.0), 0),
        (params(seed=2), 1),
    ]
    batched = _run_batched(schnell.pipeline, requests)
    assert [s.rows for s in batched] == [2, 1]
    for (request, _), state in zip(requests, batched, strict=True):
        solo = np.stack(schnell.pipeline.generate(request))
        assert level_difference(schnell.pipeline.decode(state).numpy(), solo) <= 1


def test_mixed_sizes_in_one_call_are_refused(dev: Variant) -> None:
    small = dev.pipeline.prepare(params())
    wide = dev.pipeline.prepare(params(width=96))
    with pytest.raises(ValueError, match="one image size"):
        dev.pipeline.denoise_step([small, wide])


def test_loader_reads_the_folder_offline(variant: Variant, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = read_flux_model_files(variant.path)
    dev_style = variant.pipeline.dims.guidance_embeds
    assert files.dims == FluxDims(
        latent_channels=16,
        vae_scale_factor=8,
        clip_hidden_size=32,
        clip_tokens=77,
        t5_hidden_size=32,
        t5_tokens=T5_TOKENS,
        guidance_embeds=dev_style,
        t5_vocab_size=len(files.tokenizer_2),
    )
    assert files.dims.token_channels == 64 and files.dims.size_multiple == 16
    assert (files.vae_scaling_factor, files.vae_shift_factor) == (0.3611, 0.1159)
    assert files.scheduler_config["use_dynamic_shifting"] is dev_style
    assert files.tokenizer_2(PROMPT).input_ids[-1] == 1  # ends with </s>
    modules = load_flux_modules(variant.path)
    assert modules.transformer.config.guidance_embeds is dev_style
    assert modules.vae.config.latent_channels == 16


def test_default_t5_length_without_kiln_json(
    dev: Variant, schnell: Variant, tmp_path: Path
) -> None:
    """Without kiln.json: 512 tokens for dev-style, 256 for schnell-style (FLUX.1's
    tokenizer allows 512), capped by a shorter tokenizer."""
    for variant, expected in ((dev, 512), (schnell, 256)):
        folder = tmp_path / variant.path.name
        shutil.copytree(variant.path, folder)
        (folder / "kiln.json").unlink()
        assert read_flux_model_files(folder).max_sequence_length == T5_TOKENS
        config_file = folder / "tokenizer_2" / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config_file.write_text(json.dumps({**config, "model_max_length": 512}))
        assert read_flux_model_files(folder).max_sequence_length == expected


def test_family_detection(dev: Variant, tiny_model_path: Path, tmp_path: Path) -> None:
    assert model_family(dev.path) == "flux"
    assert model_family(tiny_model_path) == "sdxl"
    unnamed = tmp_path / "unnamed"
    (unnamed / "transformer").mkdir(parents=True)
    (unnamed / "model_index.json").write_text("{}")
    assert model_family(unnamed) == "flux"


def test_family_detection_refuses_other_folders(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match=r"no model_index\.json"):
        model_family(tmp_path)
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusion3Pipeline"})
    )
    with pytest.raises(ModelFolderError, match=r"'StableDiffusion3Pipeline'.*SDXL and FLUX"):
        model_family(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ModelFolderError, match="neither unet/ and transformer/"):
        model_family(tmp_path)
    with pytest.raises(ModelFolderError, match="does not exist"):
        model_family(tmp_path / "missing")


def test_loader_refuses_other_folders(tiny_model_path: Path, dev: Variant, tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="'StableDiffusionXLPipeline', not a FLUX"):
        read_flux_model_files(tiny_model_path)
    broken = tmp_path / "broken"
    shutil.copytree(dev.path, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ModelFolderError, match="lacks text_encoder_2"):
        read_flux_model_files(broken)
    mismatched = tmp_path / "mismatched"
    shutil.copytree(dev.path, mismatched)
    config_file = mismatched / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "joint_attention_dim": 48}))
    with pytest.raises(ModelFolderError, match="joint_attention_dim is 48 but the T5"):
        read_flux_model_files(mismatched)
    config_file.write_text(json.dumps(config))
    (mismatched / "kiln.json").write_text(json.dumps({"max_sequence_length": 600}))
    with pytest.raises(ModelFolderError, match="max_sequence_length must be an integer from 1"):
        read_flux_model_files(mismatched)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"width": 72}, "width: 72 is not a positive multiple of 16"),
        ({"height": 8}, "height: 8 is not a positive multiple of 16"),
        ({"scheduler": "K_EULER"}, "'K_EULER' is not served for FLUX models; use one of FLOW"),
        ({"num_inference_steps": 0}, "num_inference_steps must be at least 1"),
        ({"negative_prompt": "blurry"}, "negative_prompt: this FLUX model embeds distilled"),
        (
            {
                "image": ImageConditioning(
                    np.zeros((64, 64, 3), np.uint8), 0.5, np.ones((64, 64), np.float32)
                )
            },
            "mask: FLUX models take image-to-image",
        ),
    ],
)
def test_bad_requests_are_refused(dev: Variant, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dev.pipeline.prepare(params(**overrides))


def test_limits_and_rows(dev: Variant, schnell: Variant) -> None:
    assert dev.pipeline.limits.size_multiple == 16
    assert dev.pipeline.backend == "torch" and dev.pipeline.loras is None
    # Distilled guidance adds no rows; true CFG doubles them.
    assert dev.pipeline.rows_for(params(guidance_scale=7.0, num_outputs=3)) == 3
    assert schnell.pipeline.rows_for(params(guidance_scale=7.0, num_outputs=3)) == 3
    assert schnell.pipeline.rows_for(params(negative_prompt="", num_outputs=3)) == 6


def test_component_declarations() -> None:
    request = ShapeRequest(batch=2, height=1024, width=768)
    for guidance in (True, False):
        specs = flux_component_specs(FluxDims(guidance_embeds=guidance))
        transformer = specs["transformer"]
        assert ("guidance" in {t.name for t in transformer.inputs}) is guidance
        shapes = transformer.shapes(request)
        assert shapes["hidden_states"] == (2, 64 * 48, 64) == shapes["noise_pred"]
        assert shapes["img_ids"] == (64 * 48, 3) and shapes["txt_ids"] == (512, 3)
        assert shapes["encoder_hidden_states"] == (2, 512, 4096)
        assert specs["vae_decoder"].shapes(request)["latent"] == (2, 16, 128, 96)
        assert specs["text_encoder"].shapes(request)["pooled"] == (2, 768)
    assert transformer.dynamic_axes()["img_ids"] == {0: "image_tokens"}


def test_packing_round_trip_and_ids() -> None:
    latents = torch.randn(2, 16, 6, 4)
    tokens = pack_latents(latents)
    assert tokens.shape == (2, 6, 64)
    assert torch.equal(unpack_latents(tokens, 6, 4), latents)
    ids = latent_image_ids(3, 2, torch.device("cpu"))
    assert ids.tolist() == [[0, r, c] for r in range(3) for c in range(2)]


def test_previews(dev: Variant) -> None:
    state = dev.pipeline.prepare(params(num_outputs=2, width=96, height=48))
    before = dev.pipeline.preview_pixels(state)
    dev.pipeline.denoise_step([state])
    after = dev.pipeline.preview_pixels(state)
    assert before.dtype == torch.uint8 and after.shape == (6, 2 * 12, 3)
    assert not torch.equal(before, after)
    preview = dev.pipeline.preview(state, PreviewParams(every_n_steps=1, max_size=64))
    assert (preview.width, preview.height) == (64, 16)
    with pytest.raises(ValueError, match="'decoder' is not served for this model"):
        dev.pipeline.preview_pixels(state, "decoder")


class LinearDecoderModule(torch.nn.Module):
    """A VAE decoder that is exactly linear per latent pixel in the scaled space: each
    latent pixel becomes an 8x8 block of factors-mapped colour."""

    def __init__(self, factors: torch.Tensor, bias: torch.Tensor, scale: float, shift: float):
        super().__init__()
        self.factors, self.bias, self.scale, self.shift = factors, bias, scale, shift

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        scaled = (latent - self.shift) * self.scale
        rgb = torch.einsum("bchw,cr->brhw", scaled, self.factors) + self.bias[:, None, None]
        return rgb.repeat_interleave(8, 2).repeat_interleave(8, 3)


def test_latent_rgb_fit_recovers_a_linear_decoder(dev: Variant) -> None:
    """Against a decoder that is exactly linear per latent pixel, the fit finds its map."""
    files = dev.pipeline.files
    factors = torch.randn(16, 3, generator=torch.Generator().manual_seed(0)) * 0.1
    bias = torch.tensor([0.1, -0.2, 0.3])
    module = LinearDecoderModule(factors, bias, files.vae_scaling_factor, files.vae_shift_factor)
    decoder = TorchEngine(vae_decoder_spec(files.dims.vae_dims()), module)
    fitted, fitted_bias = fit_latent_rgb(files, decoder, torch.device("cpu"))
    assert torch.allclose(fitted, factors, atol=1e-5)
    assert torch.allclose(fitted_bias, bias, atol=1e-5)


def test_project_t5_tokenizer(dev: Variant) -> None:
    tokenizer = project_t5_tokenizer(t5_words(), T5_TOKENS)
    ids = tokenizer("a red zebra").input_ids
    assert tokenizer.convert_ids_to_tokens(ids[:2]) == ["\u2581a", "\u2581red"]
    assert 2 not in ids, "an unknown word is spelled in characters, not <unk>"
    assert ids[-1] == 1
    saved = dev.pipeline.files.tokenizer_2
    assert saved("A Red teapot!").input_ids == tokenizer("A Red teapot!").input_ids
    with pytest.raises(ValueError, match="without whitespace"):
        project_t5_tokenizer(["two words"], T5_TOKENS)


def test_ensure_tiny_flux_is_idempotent(dev: Variant, flux_cache: Path) -> None:
    stamp = (dev.path / "transformer" / "config.json").stat().st_mtime_ns
    assert ensure_tiny_flux(flux_cache, guidance=True) == dev.path
    assert (dev.path / "transformer" / "config.json").stat().st_mtime_ns == stamp
    assert ensure_tiny_flux(flux_cache, guidance=False) != dev.path
