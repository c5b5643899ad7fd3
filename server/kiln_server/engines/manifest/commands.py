"""The command lines manifest messages recommend: the `kiln build-engines` rebuild and the
TensorRT install."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

INSTALL_TENSORRT = "pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu12"


def build_command(
    fmt: str,
    engines_dir: Path,
    *,
    model_name: str | None = None,
    config: str | None = None,
    extra_args: Sequence[str] = (),
) -> str:
    """The `kiln build-engines` command line that (re)builds `fmt` engines into `engines_dir`.

    Engines of model NAME live in <root>/NAME/ (the layout `kiln serve --engines <root>`
    reads), so the command is `--model NAME --out <root>`, with NAME defaulting to the
    directory's name; `config` adds the `--config` file that defines NAME.
    """
    parts = ["kiln", "build-engines"]
    if config:
        parts += ["--config", config]
    parts += ["--model", model_name or engines_dir.name, "--format", fmt]
    parts += ["--out", str(engines_dir.parent), *extra_args]
    return shlex.join(parts)
