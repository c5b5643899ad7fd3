"""The engine core process end to end: its death never strands a request or a process.

`kiln serve` runs the batcher and the models in a child process (kiln_server.core). These
tests kill one side or the other and check what users and supervisors see.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from e2e_support import RPC_TIMEOUT, expect_error, open_stub, request, wait_for_log

EXIT_TIMEOUT = 60.0


def core_pid(server: Any) -> int:
    """Process id of the server's engine core, from its start-up log."""
    record = wait_for_log(server.logs, lambda r: r["message"] == "engine core started")
    return int(record["pid"])


def is_running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_gone(pid: int, timeout: float = EXIT_TIMEOUT) -> bool:
    """Wait for `pid` to exit; True if it did within `timeout`."""
    deadline = time.monotonic() + timeout
    while is_running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_the_models_run_in_a_separate_engine_core(kiln_server: Any) -> None:
    pid = core_pid(kiln_server)
    assert pid != kiln_server.process.pid
    assert is_running(pid)
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        assert b"kiln_server.core.process" in cmdline.read()


def test_a_lost_engine_core_ends_requests_with_unavailable_and_exits_1(
    server_factory: Any,
) -> None:
    server = server_factory("--backend", "torch")
    pid = core_pid(server)
    with ThreadPoolExecutor(1) as pool, open_stub(server.address) as stub:
        call = stub.Generate(request(seed=3, num_inference_steps=150), timeout=RPC_TIMEOUT)
        first_progress = next(e for e in call if e.WhichOneof("event") == "progress")
        assert first_progress.progress.step >= 1
        rest = pool.submit(list, call)
        os.kill(pid, signal.SIGKILL)
        error = expect_error(lambda: rest.result(timeout=RPC_TIMEOUT))
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert "engine core exited unexpectedly" in (error.details() or "")
    # The supervisor (Docker, Kubernetes, systemd) sees a failure and restarts the server.
    assert server.process.wait(timeout=EXIT_TIMEOUT) == 1
    record = wait_for_log(server.logs, lambda r: r["level"] == "error")
    assert "exit code -9" in record["message"], server.logs()


def test_a_killed_server_takes_its_engine_core_with_it(server_factory: Any) -> None:
    server = server_factory("--backend", "torch")
    pid = core_pid(server)
    server.process.kill()
    server.process.wait(timeout=EXIT_TIMEOUT)
    assert wait_gone(pid), "the engine core outlived its server"


def test_a_server_killed_while_loading_leaves_no_engine_core(server_factory: Any) -> None:
    server = server_factory("--backend", "torch", wait_serving=False)
    pid = core_pid(server)
    assert "ready: SERVING" not in server.logs(), "too late: loading already finished"
    server.process.kill()
    server.process.wait(timeout=EXIT_TIMEOUT)
    assert wait_gone(pid), "the engine core outlived its server"


def test_sigterm_while_loading_stops_at_once_and_cleanly(server_factory: Any) -> None:
    server = server_factory("--backend", "torch", wait_serving=False)
    pid = core_pid(server)
    assert "ready: SERVING" not in server.logs(), "too late: loading already finished"
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=EXIT_TIMEOUT) == 0, server.logs()
    # Loading is abandoned rather than awaited (the core is killed, not asked to stop).
    assert time.monotonic() - started < 20, server.logs()
    assert wait_gone(pid)
    logs = server.logs()
    assert "ready: SERVING" not in logs
    assert "did not stop" not in logs and "Traceback" not in logs, logs
    wait_for_log(server.logs, lambda r: r["message"] == "stopped")


def test_drain_timeout_ends_leftover_requests_with_unavailable(server_factory: Any) -> None:
    server = server_factory("--backend", "torch", "--drain-timeout", "0.5")
    with ThreadPoolExecutor(1) as pool, open_stub(server.address) as stub:
        call = stub.Generate(request(seed=5, num_inference_steps=150), timeout=RPC_TIMEOUT)
        next(e for e in call if e.WhichOneof("event") == "progress")
        rest = pool.submit(list, call)
        server.process.send_signal(signal.SIGTERM)
        error = expect_error(lambda: rest.result(timeout=RPC_TIMEOUT))
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert error.details() == "the server stopped before this request finished"
    assert server.process.wait(timeout=EXIT_TIMEOUT) == 0
    wait_for_log(server.logs, lambda r: r["message"].startswith("drain timeout reached"))


def test_interrupting_the_engine_core_does_not_stop_serving(server_factory: Any) -> None:
    """Ctrl-C reaches every process of the terminal's group; only the API process acts."""
    server = server_factory("--backend", "torch")
    pid = core_pid(server)
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    with open_stub(server.address) as stub:
        events = list(stub.Generate(request(seed=4, num_inference_steps=2), timeout=RPC_TIMEOUT))
    assert events[-1].WhichOneof("event") == "completed"
    assert is_running(pid)
