"""Shared by the engine tests: the tiny model's ONNX engines, built once per session.

Fixtures that need the engines call `tiny_engines` from their own session-scoped fixture;
the first call builds them exactly as a user does (`kiln build-engines --format onnx`,
through the `kiln` dispatcher) under the session's base temp folder, and every later call
(from any test module) reuses that folder. Tests that tamper with engines work
on a copy (`copy_engines`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

MODEL_NAME = "kiln-tiny-sdxl"


def tiny_engines(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Path:
    """<session tmp>/engines/kiln-tiny-sdxl with the exported, validated graphs and manifest."""
    from kiln_client.cli import main

    root = tmp_path_factory.getbasetemp() / "engines"
    engines = root / MODEL_NAME
    if not (engines / "manifest.json").is_file():
        command = ["build-engines", "--model", MODEL_NAME, "--model-path", str(model_path)]
        assert main([*command, "--format", "onnx", "--out", str(root), "--quiet"]) == 0
    return engines


def copy_engines(source: Path, root: Path) -> Path:
    """A private copy of an engines directory at <root>/<same name>, for tampering."""
    target = root / source.name
    shutil.copytree(source, target)
    return target
