"""A watched engine, end to end: when the engine fails or stops making progress, every
request in flight ends with a precise status and `kiln serve` exits non-zero for its
supervisor, instead of serving on with requests hanging until their deadlines.

The faults come from an engine of the test suite's own (tests/faults/sitecustomize.py),
wrapped around the real UNet in the server's engine core and broken on demand.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import REPO_ROOT, TINY_MODEL_CONFIG
from e2e_support import open_stub, request

from kiln_server.local import start_local_server

FAULTS_PATH = REPO_ROOT / "tests" / "faults"


class Stream:
    """One Generate call on a thread: its events so far and how it ended."""

    def __init__(self, stub: Any, message: Any) -> None:
        self.events: list[str] = []
        self.error: grpc.RpcError | None = None
        self.progressed = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(stub, message), daemon=True)
        self.thread.start()

    def _run(self, stub: Any, message: Any) -> None:
        try:
            for event in stub.Generate(message, timeout=120):
                self.events.append(str(event.WhichOneof("event")))
                if event.WhichOneof("event") == "progress":
                    self.progressed.set()
        except grpc.RpcError as error:
            self.error = error


@pytest.mark.parametrize(
    ("fault", "cause"),
    [("raise", "injected device fault"), ("hang", "made no progress for 2 s")],
)
def test_engine_fault_ends_every_request_and_the_server(
    tmp_path: Path, kiln_cache_dir: Path, fault: str, cause: str
) -> None:
    faults = tmp_path / "faults"
    faults.mkdir()
    config = tmp_path / "kiln.toml"
    config.write_text(TINY_MODEL_CONFIG)
    python_path = os.pathsep.join(filter(None, [str(FAULTS_PATH), os.environ.get("PYTHONPATH")]))
    server = start_local_server(
        tmp_path,
        "--config",
        str(config),
        "--intra-op-threads",
        "1",
        "--engine-stall-seconds",
        "2",
        env={
            "KILN_CACHE_DIR": str(kiln_cache_dir),
            "KILN_TEST_FAULTS": str(faults),
            "PYTHONPATH": python_path,
        },
    )
    try:
        with open_stub(server.address) as stub:
            running = Stream(stub, request("a teapot", seed=1, num_inference_steps=150))
            assert running.progressed.wait(60), running.events
            (faults / fault).touch()
            # Admitted next to the broken engine, or waiting for it: it ends too.
            late = Stream(stub, request("a vase", seed=2, num_inference_steps=4, width=48))
            for stream in (running, late):
                stream.thread.join(60)
                assert stream.error is not None, stream.events
                assert stream.error.code() in (
                    grpc.StatusCode.INTERNAL,
                    grpc.StatusCode.UNAVAILABLE,
                )
            assert running.error is not None
            assert running.error.code() == grpc.StatusCode.INTERNAL
            assert cause in running.error.details()
            assert "completed" not in running.events
        assert server.process.wait(timeout=60) == 1
        logs = server.logs()
        assert "the engine failed; the engine core exits" in logs
        assert cause in logs
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
