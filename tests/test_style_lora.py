"""The shipped style LoRA of kiln-shapes (models/kiln-shapes/loras/closeup.safetensors).

It loads with diffusers' `load_lora_weights`; the style check (`evaluate.style_present`)
is false on the base model's images and true on the LoRA's for the same prompts and
seeds; at scale 0 the image is the base model's; and the data generator's style option
draws the style.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kiln_training import style_lora
from kiln_training.dataset import caption, prompt_set, render_scene, sample_scenes
from kiln_training.evaluate import score, style_present

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "kiln-shapes"
LORA = MODEL / "loras" / "closeup.safetensors"
PROMPTS = 6


def test_generator_style_option_draws_the_style() -> None:
    styled = sample_scenes(48, seed=5, style="closeup")
    plain = sample_scenes(48, seed=5)
    assert all(style_present(render_scene(scene)) for scene in styled)
    assert not any(style_present(render_scene(scene)) for scene in plain)
    # Same captions, and the pixel judge still reads the styled scenes as their prompts.
    assert [caption(s) for s in styled] == [caption(s) for s in plain]
    for scene in styled:
        result = score(render_scene(scene), scene)
        assert result.colours_right and result.shape_right


def test_unknown_style_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown style"):
        sample_scenes(1, seed=0, style="sparkles")
    with pytest.raises(ValueError, match="unknown style"):
        style_present(np.zeros((64, 64, 3), dtype=np.uint8), "sparkles")


@pytest.fixture(scope="module")
def pipe() -> object:
    from diffusers import StableDiffusionXLPipeline

    torch.set_num_threads(1)
    pipeline = StableDiffusionXLPipeline.from_pretrained(
        str(MODEL), dtype=torch.float32, add_watermarker=False
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _generate(pipe: object, prompts: list[str]) -> list[np.ndarray]:
    with torch.no_grad():
        result = pipe(  # type: ignore[operator]
            prompt=prompts,
            num_inference_steps=20,
            guidance_scale=5.0,
            width=64,
            height=64,
            generator=[torch.Generator().manual_seed(1000 + i) for i in range(len(prompts))],
            output_type="np",
        )
    return [np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8) for image in result.images]


def test_lora_loads_and_shows_the_style(pipe: object) -> None:
    assert LORA.is_file()
    prompts = [caption(scene) for scene in prompt_set(PROMPTS)]
    base = _generate(pipe, prompts)
    pipe.load_lora_weights(  # type: ignore[attr-defined]
        str(LORA.parent), weight_name=LORA.name, adapter_name="closeup"
    )
    assert "closeup" in pipe.get_list_adapters()["unet"]  # type: ignore[attr-defined]
    pipe.set_adapters(["closeup"], adapter_weights=[1.0])  # type: ignore[attr-defined]
    styled = _generate(pipe, prompts)
    pipe.set_adapters(["closeup"], adapter_weights=[0.0])  # type: ignore[attr-defined]
    off = _generate(pipe, prompts)
    pipe.unload_lora_weights()  # type: ignore[attr-defined]

    assert not any(style_present(image) for image in base)
    assert sum(style_present(image) for image in styled) >= PROMPTS - 1
    for a, b in zip(off, base, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.mark.parametrize(
    "flag",
    [
        ["--rank", "0"],
        ["--batch", "0"],
        ["--latent-pool", "4", "--batch", "8"],
        ["--uncond-prob", "1.0"],
        ["--ema-decay", "-0.1"],
        ["--lr", "0"],
        ["--warmup-steps", "-1"],
    ],
)
def test_bad_training_settings_exit_2_naming_the_flag(
    flag: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        style_lora.parse_args(["--model", "m", "--out", "o.safetensors", *flag])
    assert stopped.value.code == 2
    assert flag[0] in capsys.readouterr().err
