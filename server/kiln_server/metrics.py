"""Prometheus metrics of `kiln serve`, served at /metrics on `--metrics-port`.

Modelled on Triton's: requests by model and outcome, where their time went (queue,
inference, engine) as histograms and as running totals, images generated, model loads,
and the engine core's load (pending requests, running batch rows) and memory per device.
The API process computes most of them from the events it already receives; the engine
core's load and memory arrive as periodic CoreStats reports. Everything is registered in
one registry per server, so several servers in one process (tests) never share counts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from kiln_server.core.messages import CoreStats, ServedModel
from kiln_server.library.state import LibraryStatus, ModelState

__all__ = ["OUTCOMES", "MetricsEndpoint", "ServerMetrics"]

logger = logging.getLogger(__name__)

# How a Generate call ended: the `outcome` label of kiln_requests_total.
OUTCOMES = (
    "completed",
    "invalid",  # INVALID_ARGUMENT
    "not_found",  # unknown model
    "refused",  # RESOURCE_EXHAUSTED: the queue was full
    "unavailable",  # loading, draining, or the engine core is gone
    "cancelled",  # the client cancelled
    "deadline_exceeded",  # the client's deadline passed
    "failed",  # the engine failed (INTERNAL)
)
# Label for a request naming a model the server does not serve: its name is user input,
# and one label value per typo would grow the series without bound.
UNKNOWN_MODEL = "(unknown)"
# Seconds: from a step of a tiny model on a GPU to a large batch on a CPU.
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip


class ServerMetrics:
    """Every `kiln_*` metric of one server, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "kiln_requests",
            "Generate calls that ended, by model and outcome.",
            ["model", "outcome"],
            registry=registry,
        )
        self.queue_duration = Histogram(
            "kiln_queue_duration_seconds",
            "Seconds a completed request waited in the queue before joining the batch.",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.inference_duration = Histogram(
            "kiln_inference_duration_seconds",
            "Seconds a completed request spent in the running batch, decoding and encoding "
            "included.",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.engine_duration = Histogram(
            "kiln_engine_duration_seconds",
            "Engine (GPU) seconds of a completed request: its share of every batched engine "
            "call it was part of.",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.queue_seconds = Counter(
            "kiln_queue_seconds",
            "Total seconds completed requests waited in the queue.",
            ["model"],
            registry=registry,
        )
        self.inference_seconds = Counter(
            "kiln_inference_seconds",
            "Total seconds completed requests spent in inference.",
            ["model"],
            registry=registry,
        )
        self.engine_seconds = Counter(
            "kiln_engine_seconds",
            "Total engine (GPU) seconds of completed requests.",
            ["model"],
            registry=registry,
        )
        self.images = Counter(
            "kiln_images", "Images generated and sent.", ["model"], registry=registry
        )
        self.model_loads = Counter(
            "kiln_model_loads",
            "Models loaded and warmed up by the engine core, by model and backend.",
            ["model", "backend"],
            registry=registry,
        )
        self.lora_loads = Counter(
            "kiln_lora_loads",
            "LoRAs read from disk and made resident by the engine core (first use, or again "
            "after eviction), by model.",
            ["model"],
            registry=registry,
        )
        self.pending = Gauge(
            "kiln_pending_requests",
            "Requests waiting in the engine core's queue.",
            ["model"],
            registry=registry,
        )
        self.batch_rows = Gauge(
            "kiln_batch_rows",
            "UNet/transformer rows per step of the running batch (outputs, doubled under "
            "classifier-free guidance).",
            ["model"],
            registry=registry,
        )
        self.model_memory = Gauge(
            "kiln_model_memory_bytes",
            "Device bytes each resident model's engines hold (0 while not resident), "
            "counted against --model-memory-budget.",
            ["model"],
            registry=registry,
        )
        self.model_resident = Gauge(
            "kiln_model_resident",
            "1 while the model is resident in the engine core, else 0.",
            ["model"],
            registry=registry,
        )
        self.memory = Gauge(
            "kiln_memory_bytes",
            "Engine core memory per device: resident set size for cpu, "
            "torch.cuda.memory_allocated for a GPU.",
            ["device"],
            registry=registry,
        )
        self._models: tuple[str, ...] = ()
        self._lora_loads_seen: dict[str, int] = {}
        self._model_loads_seen: dict[str, int] = {}
        self._backends: dict[str, str] = {}
        self._lock = threading.Lock()

    def declare_models(self, names: Iterable[str]) -> None:
        """Start every served model's series at zero, so rates exist before the first
        request and a model's gauges drop to 0 when it goes idle."""
        with self._lock:
            self._models = tuple(names)
        for name in self._models:
            for outcome in OUTCOMES:
                self.requests.labels(name, outcome)
            for metric in (
                self.queue_duration,
                self.inference_duration,
                self.engine_duration,
                self.queue_seconds,
                self.inference_seconds,
                self.engine_seconds,
                self.images,
            ):
                metric.labels(name)
            self.pending.labels(name).set(0)
            self.batch_rows.labels(name).set(0)

    def models_loaded(self, served: Iterable[ServedModel]) -> None:
        """The engine core reported these models loaded and warm."""
        for model in served:
            self.model_loads.labels(model.name, model.backend).inc()
            with self._lock:
                self._model_loads_seen[model.name] = 1
                self._backends[model.name] = model.backend

    def request_ended(self, model: str, outcome: str) -> None:
        """Count one Generate call by how it ended."""
        self.requests.labels(model, outcome).inc()

    def request_completed(
        self,
        model: str,
        images: int,
        queue_seconds: float,
        inference_seconds: float,
        engine_seconds: float,
    ) -> None:
        """Record where a completed request's time went and the images it produced."""
        self.queue_duration.labels(model).observe(queue_seconds)
        self.inference_duration.labels(model).observe(inference_seconds)
        self.engine_duration.labels(model).observe(engine_seconds)
        self.queue_seconds.labels(model).inc(queue_seconds)
        self.inference_seconds.labels(model).inc(inference_seconds)
        self.engine_seconds.labels(model).inc(engine_seconds)
        self.images.labels(model).inc(images)

    def core_stats(self, stats: CoreStats) -> None:
        """Apply the engine core's latest load and memory report (any thread)."""
        pending, rows = dict(stats.pending), dict(stats.running_rows)
        with self._lock:
            models = self._models
        for name in {*models, *pending, *rows}:
            self.pending.labels(name).set(pending.get(name, 0))
            self.batch_rows.labels(name).set(rows.get(name, 0))
        for device, resident in stats.memory:
            self.memory.labels(device).set(resident)
        for name, total in stats.lora_loads:  # the core reports running totals
            with self._lock:
                new = total - self._lora_loads_seen.get(name, 0)
                self._lora_loads_seen[name] = total
            if new > 0:
                self.lora_loads.labels(name).inc(new)
        if stats.library is not None:
            self._library(stats.library)

    def _library(self, library: LibraryStatus) -> None:
        for status in library.models:
            resident = status.state is ModelState.RESIDENT
            self.model_resident.labels(status.name).set(1 if resident else 0)
            self.model_memory.labels(status.name).set(status.memory_bytes if resident else 0)
            with self._lock:  # the core reports running totals
                new = status.loads - self._model_loads_seen.get(status.name, 0)
                self._model_loads_seen[status.name] = status.loads
                backend = self._backends.get(status.name, "")
            if new > 0:
                self.model_loads.labels(status.name, backend).inc(new)


class MetricsEndpoint:
    """prometheus_client's HTTP server for one registry, on its own port and thread."""

    def __init__(self, metrics: ServerMetrics, host: str, port: int) -> None:
        self._server: WSGIServer
        self._server, self._thread = start_http_server(port, host, registry=metrics.registry)
        self.port: int = self._server.server_port

    def close(self) -> None:
        """Stop answering and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
