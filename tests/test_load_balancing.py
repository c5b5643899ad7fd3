"""Scale-out: two `kiln serve` replicas behind a real load balancer and behind the client's own
round_robin, with one replica killed mid-load.

nginx (Debian's package, installed by `make test-deps`) proxies gRPC (`grpc_pass`) to both
replicas on loopback. Requests sent through it with `KilnClient` must reach both replicas
(counted by each replica's `kiln_requests_total`); then one replica is SIGKILLed while it
is generating, and the client's retry policy must still complete every request, on the
survivor. The same again with no proxy: the client's round_robin over both addresses.
"""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from e2e_support import log_records
from test_metrics import metrics_port, scraper, value

from kiln_client.client import KilnClient
from kiln_client.results import GenerationResult
from kiln_server.local import LocalServer

MODEL = "tiny"
SIZE = 32  # the tiny model's smallest size
QUICK_STEPS = 2
# Long enough that the victim is still generating when it is killed (about 10 ms a step).
LOAD_STEPS = 60
REQUESTS = 12
CONCURRENCY = 4
RESUBMITTED = "submitting it again"


def nginx_binary() -> str:
    """The nginx executable; fails (not skips) the test without one: CI must run this."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if found is None:
        pytest.fail(
            "nginx is not installed: `make test-deps` installs it (Debian's nginx package), "
            "as `make test` does before running the tests"
        )
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


NGINX_CONFIG = """
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    upstream kiln {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port} http2;
        location / {{ grpc_pass grpc://kiln; }}
    }}
}}
"""


@contextmanager
def nginx_grpc_proxy(root: Path, backends: list[str]) -> Iterator[str]:
    """nginx on a free loopback port proxying gRPC round-robin to `backends`; its address."""
    binary = nginx_binary()
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    servers = "\n".join(f"        server {backend};" for backend in backends)
    config = root / "nginx.conf"
    config.write_text(NGINX_CONFIG.format(root=root, servers=servers, port=port))
    process = subprocess.Popen(
        [binary, "-c", str(config), "-p", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                log = root / "error.log"
                if process.poll() is not None or time.monotonic() > deadline:
                    text = log.read_text() if log.exists() else ""
                    pytest.fail(f"nginx did not start:\n{text}")
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=15)


@dataclass
class Replica:
    """One `kiln serve` and its /metrics."""

    server: LocalServer
    scrape: Callable[[], Any]

    def completed(self) -> float:
        """Its kiln_requests_total{outcome="completed"} now."""
        return value(self.scrape(), "kiln_requests_total", model=MODEL, outcome="completed")

    def request_ids(self, message: str) -> list[str]:
        """Request ids of its log records with `message` ("request submitted"/"completed")."""
        records = log_records(self.server.logs())
        return [r["request_id"] for r in records if r.get("message") == message]

    def generating_fresh(self) -> bool:
        """True when a request it received after its last completion is still running: one
        with most of its steps ahead (requests of one batch finish together)."""
        messages = [
            (r.get("message"), r.get("request_id")) for r in log_records(self.server.logs())
        ]
        done = {rid for message, rid in messages if message == "request completed"}
        last = max((i for i, (m, _) in enumerate(messages) if m == "request completed"), default=-1)
        return any(
            message == "request submitted" and rid not in done
            for message, rid in messages[last + 1 :]
        )


def start_replica(server_factory: Any) -> Replica:
    server = server_factory("--backend", "torch", "--metrics-port", "0")
    return Replica(server, scraper(metrics_port(server)))


@dataclass
class LoadResult:
    """What one burst of requests measured."""

    results: list[GenerationResult]
    # Requests the killed replica had taken and never finished: the kill was mid-load.
    interrupted: int
    # Streams the client submitted again; an attempt that died before any event is instead
    # retried by gRPC itself (nginx answers it UNAVAILABLE), which logs nothing.
    resubmitted: int
    statuses: list[str]  # how the resubmitted streams broke
    served: dict[str, int]  # replica label -> requests it completed (by request id)


def run_load(
    client: KilnClient,
    replicas: dict[str, Replica],
    caplog: pytest.LogCaptureFixture,
    steps: int,
    kill: Replica | None = None,
) -> LoadResult:
    """REQUESTS generations, CONCURRENCY at a time; SIGKILL `kill` mid-load: once it has
    completed some of them and started another."""
    caplog.clear()
    killer: threading.Thread | None = None
    if kill is not None:
        victim = kill
        done_before = len(victim.request_ids("request completed"))

        def kill_mid_load() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                done = len(victim.request_ids("request completed")) - done_before
                if done >= 1 and victim.generating_fresh():
                    break
                time.sleep(0.005)
            victim.server.process.send_signal(signal.SIGKILL)

        killer = threading.Thread(target=kill_mid_load)
        killer.start()

    def one(index: int) -> GenerationResult:
        return client.generate(
            f"a red circle {index}",
            width=SIZE,
            height=SIZE,
            num_inference_steps=steps,
            num_outputs=2,
            timeout=120,
        )

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(one, range(REQUESTS)))
    if killer is not None:
        killer.join()
        assert kill is not None and kill.server.process.wait(timeout=10) == -signal.SIGKILL
    completed_by = {
        label: set(replica.request_ids("request completed")) for label, replica in replicas.items()
    }
    served = {
        label: sum(result.request_id in ids for result in results)
        for label, ids in completed_by.items()
    }
    interrupted = 0
    if kill is not None:
        unfinished = set(kill.request_ids("request submitted")) - set(
            kill.request_ids("request completed")
        )
        interrupted = len(unfinished)
    broken = [record for record in caplog.records if RESUBMITTED in record.getMessage()]
    statuses = sorted({getattr(record, "status", "?") for record in broken})
    return LoadResult(results, interrupted, len(broken), statuses, served)


def check_complete(load: LoadResult) -> None:
    """Every request completed once, with each of its images exactly once."""
    assert len(load.results) == REQUESTS
    for result in load.results:
        assert [image.index for image in result.images] == [0, 1]
        assert result.seeds[1] == result.seeds[0] + 1
    assert sum(load.served.values()) == REQUESTS, load.served


@pytest.fixture
def client_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="kiln_client")
    return caplog


def test_two_replicas_behind_nginx_and_behind_round_robin(
    server_factory: Any, tmp_path: Path, client_logs: pytest.LogCaptureFixture
) -> None:
    nginx_binary()  # fail before starting anything when it is missing
    first, second = start_replica(server_factory), start_replica(server_factory)
    replicas = {"first": first, "second": second}
    report: dict[str, Any] = {}

    # 1. Through nginx: both replicas serve.
    backends = [first.server.address, second.server.address]
    with nginx_grpc_proxy(tmp_path / "nginx", backends) as proxy, KilnClient(proxy) as client:
        client.wait_until_ready(timeout=30)
        balanced = run_load(client, replicas, client_logs, QUICK_STEPS)
        check_complete(balanced)
        counted = {label: int(replica.completed()) for label, replica in replicas.items()}
        assert counted["first"] > 0 and counted["second"] > 0, counted
        assert sum(counted.values()) == REQUESTS
        report["nginx"] = {"served": counted, "resubmitted": balanced.resubmitted}

        # 2. Kill the first replica while it generates: all complete, on the survivor.
        before = second.completed()
        failover = run_load(client, replicas, client_logs, LOAD_STEPS, kill=first)
        check_complete(failover)
        assert failover.interrupted >= 1, "the kill interrupted no request: not mid-load"
        after_kill = failover.served["second"]
        assert second.completed() - before == after_kill
        report["nginx_kill"] = {
            "served": failover.served,
            "interrupted": failover.interrupted,
            "resubmitted": failover.resubmitted,
            "broken_with": failover.statuses,
        }

    # 3. No proxy: the client's round_robin over a fresh first replica and the survivor.
    third = start_replica(server_factory)
    replicas = {"second": second, "third": third}
    before = {label: replica.completed() for label, replica in replicas.items()}
    with KilnClient(f"{second.server.address},{third.server.address}") as client:
        client.wait_until_ready(timeout=30)
        balanced = run_load(client, replicas, client_logs, QUICK_STEPS)
        check_complete(balanced)
        counted = {
            label: int(replica.completed() - before[label]) for label, replica in replicas.items()
        }
        assert counted["second"] > 0 and counted["third"] > 0, counted
        report["round_robin"] = {"served": counted, "resubmitted": balanced.resubmitted}

        failover = run_load(client, replicas, client_logs, LOAD_STEPS, kill=third)
        check_complete(failover)
        assert failover.interrupted >= 1, "the kill interrupted no request: not mid-load"
        report["round_robin_kill"] = {
            "served": failover.served,
            "interrupted": failover.interrupted,
            "resubmitted": failover.resubmitted,
            "broken_with": failover.statuses,
        }
    print(f"\nload balancing ({REQUESTS} requests per phase): {report}")


def test_a_missing_nginx_fails_and_names_make_test_deps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    with pytest.raises(pytest.fail.Exception, match="make test-deps"):
        nginx_binary()
