"""Prometheus metrics: `kiln serve --metrics-port`, the gateway's /metrics, the dashboard.

The server's counters are checked against what the requests themselves reported (their
`completed` timings and images), its engine-core gauges against a batch made to hold one
running job and one waiting one; the gateway's against predictions and webhooks of known
outcome; and every metric the Grafana dashboard queries must be one that is exported.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from conftest import REPO_ROOT
from e2e_support import generate, of_kind, open_stub, request
from gateway_support import fake_kiln, in_process, settings_for, wait_until, webhook_receiver
from prometheus_client.parser import text_string_to_metric_families

from kiln_gateway.metrics import GatewayMetrics
from kiln_server.local import LocalServer
from kiln_server.metrics import ServerMetrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "kiln.json"


def parse(text: str) -> Samples:
    """Every sample of a /metrics page by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def metrics_port(server: LocalServer) -> int:
    """The port `--metrics-port 0` bound, from the server's JSON log."""

    def logged() -> int | None:
        for line in server.logs().splitlines():
            if '"metrics_port"' in line:
                return int(json.loads(line)["metrics_port"])
        return None

    port: int = wait_until(logged, 30, "the metrics port in the log")
    return port


def scraper(port: int) -> Callable[[], Samples]:
    def scrape() -> Samples:
        reply = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert reply.status_code == 200
        return parse(reply.text)

    return scrape


def scraped_when(
    scrape: Callable[[], Samples], condition: Callable[[Samples], bool]
) -> Callable[[], Samples | None]:
    """A wait_until check: one scrape, returned when `condition` holds on it."""

    def check() -> Samples | None:
        samples = scrape()
        return samples if condition(samples) else None

    return check


def test_server_metrics_count_requests_time_images_and_load(server_factory: Any) -> None:
    server = server_factory("--backend", "torch", "--metrics-port", "0", "--max-batch-rows", "2")
    scrape = scraper(metrics_port(server))
    before = wait_until(
        scraped_when(scrape, lambda s: value(s, "kiln_memory_bytes", device="cpu") > 0),
        what="the engine core's memory report",
    )
    assert value(before, "kiln_model_loads_total", model="tiny", backend="torch") == 1
    assert value(before, "kiln_requests_total", model="tiny", outcome="completed") == 0

    completed = []
    with open_stub(server.address) as stub:
        for outputs in (1, 2):
            events = generate(stub, request(num_outputs=outputs, num_inference_steps=2))
            completed.append(of_kind(events, "completed")[0])
        for bad in (request(width=37), request(model="no-such-model")):
            with pytest.raises(grpc.RpcError):
                generate(stub, bad)
    after = scrape()
    assert value(after, "kiln_requests_total", model="tiny", outcome="completed") == 2
    assert value(after, "kiln_requests_total", model="tiny", outcome="invalid") == 1
    assert value(after, "kiln_requests_total", model="(unknown)", outcome="not_found") == 1
    assert value(after, "kiln_images_total", model="tiny") == 3
    for kind in ("queue", "inference", "engine"):
        reported = sum(getattr(done, f"{kind}_seconds") for done in completed)
        assert value(after, f"kiln_{kind}_duration_seconds_count", model="tiny") == 2
        assert value(after, f"kiln_{kind}_seconds_total", model="tiny") == pytest.approx(reported)
        assert value(after, f"kiln_{kind}_duration_seconds_sum", model="tiny") == pytest.approx(
            reported
        )
    assert value(after, "kiln_engine_seconds_total", model="tiny") > 0

    # Two long jobs of two rows each under a two-row batch: one runs, one waits.
    long_job = request(width=512, height=512, num_inference_steps=150)
    with open_stub(server.address) as stub:
        calls = [stub.Generate(long_job, timeout=120) for _ in range(2)]
        ends: list[grpc.StatusCode] = []

        def read(call: Any) -> None:
            try:
                list(call)
            except grpc.RpcError as error:
                ends.append(error.code())

        readers = [threading.Thread(target=read, args=(c,), daemon=True) for c in calls]
        for reader in readers:
            reader.start()
        wait_until(
            scraped_when(
                scrape,
                lambda s: (
                    value(s, "kiln_batch_rows", model="tiny") == 2
                    and value(s, "kiln_pending_requests", model="tiny") == 1
                ),
            ),
            what="one running and one pending job in the metrics",
        )
        for call in calls:
            call.cancel()
        for reader in readers:
            reader.join(30)
        assert ends == [grpc.StatusCode.CANCELLED] * 2
        idle = wait_until(
            scraped_when(
                scrape,
                lambda s: (
                    value(s, "kiln_batch_rows", model="tiny") == 0
                    and value(s, "kiln_pending_requests", model="tiny") == 0
                    and value(s, "kiln_requests_total", model="tiny", outcome="cancelled") == 2
                ),
            ),
            what="the cancelled jobs to leave the metrics",
        )
        # A deadline that passes mid-generation counts as deadline_exceeded.
        with pytest.raises(grpc.RpcError) as raised:
            generate(stub, long_job, timeout=3.0)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(
        lambda: (
            value(scrape(), "kiln_requests_total", model="tiny", outcome="deadline_exceeded") == 1
        ),
        what="the deadline to be counted",
    )
    assert value(idle, "kiln_requests_total", model="tiny", outcome="completed") == 2
    assert server.terminate() == 0


def test_gateway_metrics_count_predictions_webhooks_and_upstream_errors(tmp_path: Path) -> None:
    create = "/v1/models/acme/fake/predictions"
    with fake_kiln() as upstream, webhook_receiver() as receiver:
        settings = settings_for(upstream, f"sqlite:///{tmp_path / 'db'}", tmp_path / "files")
        with in_process(settings) as gateway, gateway.client() as http:
            done = http.post(
                create,
                json={"input": {"prompt": "quick"}, "webhook": receiver.url},
                headers={"Prefer": "wait"},
            )
            assert done.json()["status"] == "succeeded"
            refused = http.post(create, json={"input": {"prompt": "refuse"}})
            assert refused.status_code == 422
            wait_until(lambda: len(receiver.accepted()) >= 1, what="a webhook delivery")
            # No token: scrapers seldom can send one. Any Host: they address the replica.
            metrics = httpx.get(f"{gateway.url}/metrics", headers={"Host": "10.1.2.3:9000"})
            assert metrics.status_code == 200
            samples = parse(metrics.text)
            delivered = len(receiver.accepted())
    assert value(samples, "kiln_gateway_predictions_total", status="succeeded") == 1
    assert value(samples, "kiln_gateway_predictions_total", status="rejected") == 1
    assert value(samples, "kiln_gateway_predictions_total", status="failed") == 0
    assert value(samples, "kiln_gateway_upstream_errors_total", code="INVALID_ARGUMENT") == 1
    assert value(samples, "kiln_gateway_webhook_deliveries_total", outcome="delivered") == (
        delivered
    )


def exported_names() -> set[str]:
    """Every sample name the server and the gateway can export."""
    names: set[str] = set()
    for registry in (ServerMetrics().registry, GatewayMetrics().registry):
        for family in registry.collect():
            base = family.name
            names |= {base, f"{base}_total", f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    return names


def test_the_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert expressions
    queried = {name for expr in expressions for name in re.findall(r"\bkiln_\w+", expr)}
    assert queried
    unknown = queried - exported_names()
    assert not unknown, f"the dashboard queries metrics nobody exports: {sorted(unknown)}"
