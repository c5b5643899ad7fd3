"""The client distribution installs alone and talks to a server; the server imports only its stubs.

`pip install ./clients/python` into a fresh virtual environment must bring no torch,
diffusers or onnxruntime, and its `kiln` must have exactly the client's commands and
generate an image from a real `kiln serve`.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import venv
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "onnxruntime", "transformers", "numpy", "pillow")


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with only `pip install ./clients/python` in it."""
    root = tmp_path_factory.mktemp("client-venv")
    # Build from a copy: pip's in-tree build would leave build/ and *.egg-info behind.
    source = root / "src"
    shutil.copytree(
        REPO / "clients" / "python",
        source,
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"),
    )
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=True)
    done = subprocess.run(
        [
            str(env_dir / "bin" / "python"), "-m", "pip", "install", "--quiet",
            "--disable-pip-version-check", "-c", str(REPO / "constraints.txt"), str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return env_dir


def _installed(env_dir: Path) -> set[str]:
    listed = subprocess.run(
        [str(env_dir / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line.split("==")[0].lower().replace("_", "-") for line in listed.splitlines()}


def _run_kiln(env_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # A clean environment: nothing of the development venv may leak in through PYTHONPATH.
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run(
        [str(env_dir / "bin" / "kiln"), *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_client_installs_without_the_server_stack(client_venv: Path) -> None:
    installed = _installed(client_venv)
    assert "kiln-client" in installed
    assert "grpcio" in installed and "protobuf" in installed
    assert not installed & set(HEAVY), sorted(installed & set(HEAVY))
    assert "kiln" not in installed  # the server distribution


def test_the_client_kiln_has_only_the_client_commands(client_venv: Path, tmp_path: Path) -> None:
    done = _run_kiln(client_venv, "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "generate" in done.stdout and "models" in done.stdout
    for server_command in ("serve", "build-engines", "gateway", "cost"):
        assert f"    {server_command}" not in done.stdout
    assert done.stderr == ""  # no broken plug-in warnings

    missing = _run_kiln(client_venv, "serve", cwd=tmp_path)
    assert missing.returncode == 2
    assert "invalid choice: 'serve'" in missing.stderr


def test_the_client_alone_generates_from_a_server(
    client_venv: Path, kiln_server: Any, tmp_path: Path
) -> None:
    models = _run_kiln(client_venv, "models", "--server", kiln_server.address, cwd=tmp_path)
    assert models.returncode == 0, models.stderr
    assert models.stdout.startswith("tiny (default)")

    done = _run_kiln(
        client_venv,
        "generate", "a red circle on a blue background", "--server", kiln_server.address,
        "--seed", "3", "--steps", "4", "--out", "out.png",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_the_full_install_registers_every_command() -> None:
    from kiln_client.cli import build_parser

    parser = build_parser()
    commands = next(
        action.choices for action in parser._actions if action.dest == "command"
    )  # argparse has no public accessor for subcommands
    assert set(commands) == {"generate", "models", "serve", "build-engines", "gateway", "cost"}


# The gateway is a client of the server (it calls it through kiln-client like any other
# service does), so only the packages that make up the server itself are held to the rule.
SERVER_PACKAGES = ("server/kiln_server", "build_engines/kiln_build", "training/kiln_training")


def _kiln_imports(path: Path) -> list[str]:
    """The modules of Kiln's own packages (kiln_*) that a source file imports."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return [name for name in names if name.startswith("kiln_")]


def test_server_packages_import_only_the_stubs_of_the_client() -> None:
    offenders = {
        f"{path.relative_to(REPO)}: {name}"
        for package in SERVER_PACKAGES
        for path in (REPO / package).rglob("*.py")
        for name in _kiln_imports(path)
        if name.split(".")[0] == "kiln_client" and not name.startswith("kiln_client.proto")
    }
    assert not offenders, sorted(offenders)


def test_the_client_imports_nothing_of_the_server() -> None:
    offenders = {
        f"{path.relative_to(REPO)}: {name}"
        for path in (REPO / "clients" / "python" / "kiln_client").rglob("*.py")
        for name in _kiln_imports(path)
        if name.split(".")[0] != "kiln_client"
    }
    assert not offenders, sorted(offenders)
