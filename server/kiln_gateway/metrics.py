"""The gateway's Prometheus metrics, served at GET /metrics on its HTTP port.

/metrics needs no token (Prometheus scrapers seldom send one) and is not subject to the
Host check (it carries no links); it reveals counts only, never prompts, tokens or ids.
A gateway reachable from the internet should keep /metrics to its internal network at
the ingress. Each app has its own registry, so gateways in one process never share counts.
"""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter

__all__ = ["PREDICTION_STATUSES", "WEBHOOK_OUTCOMES", "GatewayMetrics"]

# The `status` label of kiln_gateway_predictions_total: how predictions ended. `rejected`
# is one Kiln refused before accepting it (answered 422, 404, 429 or 503, never stored).
PREDICTION_STATUSES = ("succeeded", "failed", "canceled", "rejected")
# The `outcome` label of kiln_gateway_webhook_deliveries_total, one per attempt.
WEBHOOK_OUTCOMES = ("delivered", "retrying", "gave_up")


class GatewayMetrics:
    """Every `kiln_gateway_*` metric of one gateway app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.predictions = Counter(
            "kiln_gateway_predictions",
            "Predictions that ended, by final status (rejected: refused by Kiln up front).",
            ["status"],
            registry=self.registry,
        )
        self.webhook_deliveries = Counter(
            "kiln_gateway_webhook_deliveries",
            "Webhook delivery attempts by outcome (retrying: failed, to be retried; gave_up: "
            "failed for the last time).",
            ["outcome"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "kiln_gateway_upstream_errors",
            "Generate calls to the Kiln server that ended with an error, by gRPC status code.",
            ["code"],
            registry=self.registry,
        )
        for status in PREDICTION_STATUSES:
            self.predictions.labels(status)
        for outcome in WEBHOOK_OUTCOMES:
            self.webhook_deliveries.labels(outcome)

    def prediction_ended(self, status: str) -> None:
        """Count one prediction by its final status."""
        self.predictions.labels(status).inc()

    def webhook_attempt(self, outcome: str) -> None:
        """Count one webhook delivery attempt."""
        self.webhook_deliveries.labels(outcome).inc()

    def upstream_error(self, code: grpc.StatusCode) -> None:
        """Count one Generate call Kiln ended with `code`."""
        self.upstream_errors.labels(code.name).inc()
