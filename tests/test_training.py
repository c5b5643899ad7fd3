"""Tests of the shapes-model training package: dataset, evaluator, training run, shipped model.

All at small scale: the training run trains for a handful of steps (to check it is
deterministic and writes a folder Kiln's loader accepts), and the adherence check runs the
shipped model on a small prompt set at its default settings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kiln_training.dataset import (
    COLOURS,
    SHAPES,
    Scene,
    caption,
    prompt_set,
    render_batch,
    render_scene,
    sample_scenes,
    vocabulary_words,
)
from kiln_training.evaluate import adherence, judge, score
from kiln_training.train import TrainSettings, build_tokenizers, parse_args, tokenize, train

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = REPO / "models" / "kiln-shapes"


@pytest.fixture(scope="module")
def tokenizers():
    return build_tokenizers()


def test_every_caption_word_is_one_real_clip_token(tokenizers):
    for tokenizer in tokenizers:
        for word in vocabulary_words():
            pieces = tokenizer.tokenize(word)
            assert pieces == [f"{word}</w>"], f"{word!r} splits into {pieces}"
            assert tokenizer.convert_tokens_to_ids(pieces)[0] != tokenizer.unk_token_id


def test_captions_tokenize_to_their_words_through_the_real_clip_vocabulary(tokenizers):
    first, second = tokenizers
    scenes = sample_scenes(50, seed=3)
    ids = tokenize(first, [caption(s) for s in scenes])
    ids_2 = tokenize(second, [caption(s) for s in scenes])
    assert ids.shape == ids_2.shape == (50, 77)
    for row, row_2, scene in zip(ids, ids_2, scenes, strict=True):
        words = caption(scene).split()
        body = row[1 : len(words) + 1].tolist()
        assert first.decode(body).split() == words
        assert row[0] == first.bos_token_id and row[len(words) + 1] == first.eos_token_id
        # Same tokens in both encoders' inputs; only the padding differs (end token vs "!").
        assert row_2[: len(words) + 2].tolist() == row[: len(words) + 2].tolist()
        assert row_2[-1] == second.convert_tokens_to_ids("!")
    # CLIP's canonical ids for two words of the vocabulary (OpenAI's published tokenizer).
    assert first.convert_tokens_to_ids(["red</w>", "a</w>"]) == [736, 320]


def test_scenes_are_seeded_and_varied():
    assert sample_scenes(20, seed=1) == sample_scenes(20, seed=1)
    scenes = sample_scenes(400, seed=2)
    assert {s.shape for s in scenes} == set(SHAPES)
    assert {s.colour for s in scenes} == set(COLOURS) == {s.background for s in scenes}
    assert all(s.colour != s.background for s in scenes)
    assert len({(round(s.center_x, 3), round(s.extent, 3)) for s in scenes}) > 300


def test_rendered_scene_shows_its_colours():
    scene = Scene("square", "red", "blue", center_x=0.5, center_y=0.5, extent=0.5)
    image = render_scene(scene)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert tuple(image[32, 32]) == COLOURS["red"]
    assert tuple(image[2, 2]) == COLOURS["blue"]
    assert caption(scene) == "a red square on a blue background"


def test_evaluator_reads_every_ground_truth_scene_right():
    scenes = sample_scenes(300, seed=11)
    scores = [score(render_scene(s), s) for s in scenes]
    result = adherence(scores)
    assert result.colours == 1.0 and result.shape == 1.0


def test_evaluator_survives_blur_and_noise():
    rng = np.random.default_rng(0)
    scenes = sample_scenes(120, seed=12)
    scores = []
    for scene in scenes:
        image = render_scene(scene).astype(np.float32)
        # A 3x3 box blur plus pixel noise, roughly what a small decoder gives.
        padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
        blurred = sum(padded[dy : dy + 64, dx : dx + 64] for dy in range(3) for dx in range(3)) / 9
        noisy = np.clip(blurred + rng.normal(0, 12, blurred.shape), 0, 255).astype(np.uint8)
        scores.append(score(noisy, scene))
    result = adherence(scores)
    assert result.colours >= 0.98 and result.shape >= 0.95


def test_evaluator_says_wrong_when_the_image_disagrees():
    scene = Scene("circle", "yellow", "purple", 0.5, 0.5, 0.6)
    image = render_scene(scene)
    wrong = Scene("triangle", "red", "purple")
    result = score(image, wrong)
    assert result.background_right and not result.colour_right and not result.shape_right
    flat = np.full((64, 64, 3), COLOURS["green"], dtype=np.uint8)
    seen = judge(flat)
    assert seen.background == "green" and seen.colour is None and seen.shape is None


def test_prompt_set_is_fixed_and_balanced():
    scenes = prompt_set(40)
    assert scenes == prompt_set(40)
    assert len({caption(s) for s in scenes}) == 40
    for shape in SHAPES:
        assert sum(s.shape == shape for s in scenes) == 40 // len(SHAPES)


def test_cli_rejects_bad_settings(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--threads", "0"])
    assert "--threads" in capsys.readouterr().err


def _tiny_settings(out: Path) -> TrainSettings:
    return TrainSettings(
        out=out,
        seed=5,
        threads=1,
        vae_steps=2,
        vae_batch=2,
        latent_pool=8,
        unet_steps=3,
        unet_batch=2,
        warmup_steps=1,
        checkpoint_every=2,
        progress=False,
    )


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.rglob("*.safetensors")):
        for name, value in load_file(file).items():
            tensors[f"{file.parent.name}/{name}"] = value
    return tensors


def test_tiny_training_run_is_deterministic_and_loadable(tmp_path):
    from kiln_server.models.loader import load_modules, read_model_files

    first = train(_tiny_settings(tmp_path / "a")).folder
    second = train(_tiny_settings(tmp_path / "b")).folder
    weights_a, weights_b = _weights(first), _weights(second)
    assert weights_a.keys() == weights_b.keys() and len(weights_a) > 100
    for name, value in weights_a.items():
        assert torch.equal(value, weights_b[name]), name
    assert all(v.dtype == torch.float16 for v in weights_a.values())

    files = read_model_files(first)
    assert files.dims.latent_channels == 4 and files.dims.vae_scale_factor == 8
    assert files.dims.pooled_dim == 64 and files.dims.num_time_ids == 6
    assert files.kiln_config["default_width"] >= 64
    assert len(files.kiln_config["latent_rgb_factors"]) == 4
    assert all(len(row) == 3 for row in files.kiln_config["latent_rgb_factors"])
    assert len(files.kiln_config["latent_rgb_bias"]) == 3
    modules = load_modules(first)
    assert modules.unet.config.addition_embed_type == "text_time"
    assert all(p.dtype == torch.float32 for p in modules.unet.parameters())
    assert not (first / ".train-state").exists()


def test_interrupted_then_resumed_training_matches_an_uninterrupted_run(tmp_path):
    whole = train(_tiny_settings(tmp_path / "whole")).folder
    settings = _tiny_settings(tmp_path / "parts")
    settings.stop_after = 2
    assert not train(settings).done
    assert not (settings.out / "model_index.json").exists()
    # The checkpoints left for --resume keep themselves out of git.
    assert (settings.out / ".train-state" / ".gitignore").read_text() == "*\n"
    settings.stop_after = None
    settings.resume = True
    parts = train(settings)
    assert parts.done
    weights_whole, weights_parts = _weights(whole), _weights(parts.folder)
    for name, value in weights_whole.items():
        assert torch.equal(value, weights_parts[name]), name


needs_shipped_model = pytest.mark.skipif(
    not (SHIPPED_MODEL / "model_index.json").is_file(), reason="models/kiln-shapes not trained"
)


@needs_shipped_model
def test_shipped_model_is_small_and_carries_serving_defaults():
    from kiln_server.models.tiny_sdxl import KILN_DEFAULTS

    size = sum(f.stat().st_size for f in SHIPPED_MODEL.rglob("*.safetensors"))
    assert size <= 30 * 2**20
    config = json.loads((SHIPPED_MODEL / "kiln.json").read_text())
    assert set(KILN_DEFAULTS) <= set(config)
    assert config["default_width"] >= 64 and config["default_height"] >= 64
    assert not (SHIPPED_MODEL / ".train-state").exists()


@needs_shipped_model
def test_shipped_tokenizers_are_the_ones_training_used(tokenizers):
    from kiln_server.models.loader import read_model_files

    files = read_model_files(SHIPPED_MODEL)
    prompts = [caption(s) for s in prompt_set(8)]
    for shipped, used in zip((files.tokenizer, files.tokenizer_2), tokenizers, strict=True):
        assert torch.equal(tokenize(shipped, prompts), tokenize(used, prompts))


@needs_shipped_model
def test_shipped_model_preview_factors_fit_its_latents():
    from kiln_server.models.loader import load_modules, read_model_files
    from kiln_server.pipeline.previews import LatentPreviewer

    files = read_model_files(SHIPPED_MODEL)
    vae = load_modules(SHIPPED_MODEL).vae
    images = torch.from_numpy(render_batch(sample_scenes(32, seed=21)))
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean * files.vae_scaling_factor
    # What a preview should show: each 8x8 patch's mean colour, in 0..255.
    target = ((F.avg_pool2d(images, 8) + 1) * 127.5).permute(0, 2, 3, 1).numpy()

    def error(previewer: LatentPreviewer) -> float:
        previews = np.stack([previewer.to_rgb(z[None]).numpy() for z in latents]).astype(np.float32)
        return float(np.abs(previews - target).mean())

    fitted = error(LatentPreviewer.for_model(files.kiln_config))
    sdxl = error(LatentPreviewer())
    flat = float(np.abs(target - target.mean(axis=(0, 1, 2))).mean())
    # A linear map cannot undo the VAE's non-linearity, but it must beat SDXL's factors
    # and a flat average colour by a wide margin.
    assert fitted < 0.6 * sdxl, (fitted, sdxl)
    assert fitted < 0.6 * flat, (fitted, flat)


@needs_shipped_model
def test_shipped_model_follows_prompts_and_guidance_matters():
    from kiln_training.sampling import KilnSampler

    sampler = KilnSampler(SHIPPED_MODEL, backend="torch")
    scenes = prompt_set(24)
    prompts = [caption(s) for s in scenes]
    seeds = [7 + i for i in range(len(scenes))]
    images = sampler.generate(prompts, seeds)  # the model's default settings
    assert images[0].shape == (
        sampler.defaults["default_height"],
        sampler.defaults["default_width"],
        3,
    )
    guided = adherence(score(image, s) for image, s in zip(images, scenes, strict=True))
    # Small-scale version of the benchmark's bar (90% colours / 70% shape).
    assert guided.colours >= 0.9, guided
    assert guided.shape >= 0.7, guided
    unguided_images = sampler.generate(prompts, seeds, guidance_scale=1.0)
    unguided = adherence(score(image, s) for image, s in zip(unguided_images, scenes, strict=True))
    assert unguided.all_right < guided.all_right, (unguided, guided)
