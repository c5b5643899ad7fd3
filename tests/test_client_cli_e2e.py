"""`kiln generate --image --mask` as a user runs it, against a real `kiln serve` (tiny model)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

PHOTO_SIZE = (96, 64)  # not the tiny model's 64x64 default: the output size must follow it
CIRCLE = (30, 14, 66, 50)  # the "product": kept, as the black part of the mask


def test_cli_inpaints_a_photo_keeping_the_masked_out_pixels(
    kiln_server: Any, tmp_path: Path
) -> None:
    photo = Image.new("RGB", PHOTO_SIZE, (40, 60, 200))
    ImageDraw.Draw(photo).ellipse(CIRCLE, fill=(220, 30, 30))
    photo.save(tmp_path / "photo.png")
    mask = Image.new("L", PHOTO_SIZE, 255)  # white: repaint the background
    ImageDraw.Draw(mask).ellipse(CIRCLE, fill=0)  # black: keep the circle
    mask.save(tmp_path / "mask.png")

    done = subprocess.run(
        [
            sys.executable, "-m", "kiln_client.cli", "generate",
            "a red circle on a yellow background", "--image", "photo.png", "--mask", "mask.png",
            "--server", kiln_server.address, "--out", "out.png", "--seed", "7",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {Path('out.png')} (seed 7)"
    assert "inpaint at strength" in done.stderr

    with Image.open(tmp_path / "out.png") as opened:
        assert opened.size == PHOTO_SIZE
        result = np.asarray(opened.convert("RGB"))
    original = np.asarray(photo)
    keep = np.asarray(mask) == 0
    assert keep.any() and (~keep).any()
    np.testing.assert_array_equal(result[keep], original[keep])
    assert (result[~keep] != original[~keep]).any()  # the background was repainted
