"""Run `kiln serve` as a subprocess on a free local port, for tests, benchmarks and scripts.

The server is started exactly as a user starts it (the `kiln` CLI) with `--port 0
--port-file`, so the caller learns the port the kernel chose; its combined output goes to
a log file the caller can read.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


@dataclass
class LocalServer:
    """A `kiln serve` subprocess and how to reach it."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    credentials: grpc.ChannelCredentials | None = None
    """TLS credentials for its port (a server started with --tls-cert); None: plain text."""

    @property
    def address(self) -> str:
        """host:port of the server."""
        return f"127.0.0.1:{self.port}"

    def logs(self) -> str:
        """Everything the server (and its engine core) wrote so far."""
        return self.log_path.read_text(errors="replace")

    def channel(self, options: Sequence[tuple[str, Any]] | None = None) -> grpc.Channel:
        """A new channel to the server, over TLS when it has `credentials`."""
        if self.credentials is not None:
            return grpc.secure_channel(self.address, self.credentials, options=options)
        return grpc.insecure_channel(self.address, options=options)

    def health(self, service: str = "") -> int:
        """Current grpc.health.v1 status of `service`."""
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            return int(reply.status)

    def wait_for_health(self, status: int, timeout: float) -> None:
        """Poll health until it reports `status`; raise with the server log otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health() == status:
                    return
            except grpc.RpcError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server never reached health {status}:\n{self.logs()}")
            time.sleep(0.05)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM (the server drains), wait, and return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def start_local_server(
    workdir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    wait_serving: bool = True,
    timeout: float = 180,
    credentials: grpc.ChannelCredentials | None = None,
) -> LocalServer:
    """Start `kiln serve --port 0 ARGS` logging JSON to workdir/server.log.

    Returns once the port is bound, or once health is SERVING with `wait_serving` (asked
    over TLS with `credentials`, for a server given --tls-cert).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / "port"
    port_file.unlink(missing_ok=True)
    log_path = workdir / "server.log"
    command = [
        sys.executable,
        "-m",
        "kiln_server",
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--log-format",
        "json",
        *args,
    ]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    deadline = time.monotonic() + timeout
    while not port_file.exists() or not port_file.read_text().strip():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"server did not start:\n{log_path.read_text()}")
        time.sleep(0.05)
    server = LocalServer(process, int(port_file.read_text()), log_path, credentials)
    if wait_serving:
        server.wait_for_health(
            health_pb2.HealthCheckResponse.SERVING, max(deadline - time.monotonic(), 1.0)
        )
    return server
