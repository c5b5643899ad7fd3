"""Shared fixtures: the tiny SDXL model, its loaded pipeline, and real Kiln servers.

End-to-end tests talk to a real `kiln serve` subprocess on an ephemeral 127.0.0.1 port,
started exactly as a user starts it (the `kiln` CLI), with the tiny random-weight SDXL
model so the suite runs in minutes on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln_server.local import LocalServer, start_local_server

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL_CONFIG = """
[server]
default_model = "tiny"

[[models]]
name = "tiny"
builtin = "kiln-tiny-sdxl"
default_num_inference_steps = 8
"""


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread in the test process, and a private default cache folder.

    The tiny model's tensors are too small for intra-op threads to pay off, and the test
    process shares two cores with the servers it starts; several threads each then spend
    most of their time waiting on one another.
    """
    import os
    import tempfile

    import torch

    torch.set_num_threads(1)
    # Caches Kiln writes by default (model content hashes, built models) stay out of ~.
    os.environ.setdefault("KILN_CACHE_DIR", tempfile.mkdtemp(prefix="kiln-test-cache-"))


def start_server(
    workdir: Path,
    cache_dir: Path,
    *args: str,
    config: str = TINY_MODEL_CONFIG,
    wait_serving: bool = True,
    timeout: float = 180,
) -> LocalServer:
    """Start `kiln serve --port 0` with `config` and wait until health is SERVING."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "kiln.toml"
    config_path.write_text(config)
    return start_local_server(
        workdir,
        "--config",
        str(config_path),
        # Test servers share two cores with pytest and each other; one engine thread each
        # avoids threads spinning on a core another process holds.
        "--intra-op-threads",
        "1",
        *args,
        env={"KILN_CACHE_DIR": str(cache_dir)},
        wait_serving=wait_serving,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def kiln_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model cache shared by every test and server of the session."""
    return tmp_path_factory.mktemp("kiln-cache")


@pytest.fixture(scope="session")
def tiny_model_path(kiln_cache_dir: Path) -> Path:
    """Folder of the tiny random-weight SDXL model (diffusers layout)."""
    from kiln_server.models.tiny_sdxl import ensure_tiny_sdxl

    return ensure_tiny_sdxl(kiln_cache_dir / "models")


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model_path: Path):  # type: ignore[no-untyped-def]
    """The tiny model's SDXLPipeline on the torch backend, loaded once."""
    from kiln_server.engines.torch_engine import load_torch_engines
    from kiln_server.models.loader import load_modules, read_model_files
    from kiln_server.pipeline.sdxl import SDXLPipeline

    files = read_model_files(tiny_model_path)
    return SDXLPipeline(files, load_torch_engines(load_modules(tiny_model_path), files.dims))


@pytest.fixture(scope="session")
def kiln_server(
    tmp_path_factory: pytest.TempPathFactory, kiln_cache_dir: Path, tiny_model_path: Path
) -> Iterator[LocalServer]:
    """A shared real server (torch backend) for tests that do not stop or saturate it."""
    server = start_server(tmp_path_factory.mktemp("server"), kiln_cache_dir, "--backend", "torch")
    yield server
    server.terminate()


@pytest.fixture
def server_factory(tmp_path: Path, kiln_cache_dir: Path, tiny_model_path: Path) -> Iterator[object]:
    """Start dedicated servers (for shutdown and saturation tests); all stopped afterwards."""
    started: list[LocalServer] = []

    def factory(*args: str, **kwargs: object) -> LocalServer:
        server = start_server(
            tmp_path / f"server-{len(started)}",
            kiln_cache_dir,
            *args,
            **kwargs,  # type: ignore[arg-type]
        )
        started.append(server)
        return server

    yield factory
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[object]:
    """A throwaway PostgreSQL server (Debian's package) for the session; skips when absent."""
    from postgres_support import start_postgres

    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty prediction database: SQLite in the test's folder, or a new PostgreSQL one."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'predictions.db'}"
    server = request.getfixturevalue("postgres_server")
    url: str = server.new_database()
    return url
