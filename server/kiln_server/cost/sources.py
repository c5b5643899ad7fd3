"""Where `kiln cost` reads its measurement: a server's /metrics, or a load benchmark's results.

Both give, per model, the engine seconds and the images of completed requests. Engine
seconds are what the engine core timed around its engine calls for a request: prompt
encoding, every denoising step, previews and the VAE decode. A batched step's time is shared
among the requests in it by their rows (outputs, doubled under guidance), so engine seconds
per image fall as batches fill. Queue time, image encoding in the API process and idle time
are not in them.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kiln_server.cost.report import Measurement

__all__ = [
    "ENGINE_SECONDS",
    "IMAGES",
    "CostInputError",
    "fetch_metrics",
    "measurements_from_metrics",
    "measurements_from_results",
    "merge",
    "metrics_url",
    "select",
]

# The samples of kiln_server.metrics.ServerMetrics that `kiln cost` reads.
ENGINE_SECONDS = "kiln_engine_seconds_total"
IMAGES = "kiln_images_total"
NO_IMAGES = "no images generated yet{which}: send some requests or run benchmarks/load.py first"


class CostInputError(Exception):
    """A measurement that cannot be used; the message names the input and what to do."""


def metrics_url(address: str) -> str:
    """`address` as a full URL: http:// when no scheme is given, /metrics when no path is."""
    url = address if "://" in address else f"http://{address}"
    scheme, _, rest = url.partition("://")
    return url if "/" in rest else f"{scheme}://{rest}/metrics"


def fetch_metrics(url: str, timeout: float = 10.0) -> str:
    """The Prometheus text served at `url`; CostInputError when it cannot be read."""
    hint = (
        "start the server with `kiln serve --metrics-port P` and pass "
        "--metrics http://HOST:P/metrics"
    )
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body: bytes = response.read()
    except urllib.error.HTTPError as error:
        raise CostInputError(
            f"--metrics {url}: HTTP {error.code} {error.reason}; {hint}"
        ) from error
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise CostInputError(f"--metrics {url}: cannot connect ({reason}); {hint}") from error
    return body.decode("utf-8", errors="replace")


def measurements_from_metrics(text: str, source: str) -> list[Measurement]:
    """Per model, kiln_engine_seconds_total and kiln_images_total from Prometheus text."""
    engine: dict[str, float] = {}
    images: dict[str, float] = {}
    found = False
    try:
        for family in text_string_to_metric_families(text):
            found = found or family.name == ENGINE_SECONDS.removesuffix("_total")
            for sample in family.samples:
                target = {ENGINE_SECONDS: engine, IMAGES: images}.get(sample.name)
                if target is not None:
                    model = sample.labels.get("model", "")
                    target[model] = target.get(model, 0.0) + sample.value
    except ValueError as error:
        raise CostInputError(
            f"{source} is not Prometheus text ({error}); point --metrics at the /metrics of "
            "`kiln serve --metrics-port P`"
        ) from error
    if not found:
        raise CostInputError(
            f"{source} has no {ENGINE_SECONDS}: is it the /metrics of `kiln serve "
            "--metrics-port P`? (the gateway's /metrics has no engine seconds)"
        )
    return [
        Measurement(model, int(images.get(model, 0)), seconds, source)
        for model, seconds in sorted(engine.items())
    ]


def merge(groups: Sequence[Sequence[Measurement]]) -> list[Measurement]:
    """Several servers' measurements summed per model (replicas serving the same models)."""
    totals: dict[str, Measurement] = {}
    for group in groups:
        for m in group:
            seen = totals.get(m.model)
            totals[m.model] = (
                m
                if seen is None
                else Measurement(
                    m.model,
                    seen.images + m.images,
                    seen.engine_seconds + m.engine_seconds,
                    f"{seen.source} + {m.source}",
                )
            )
    return [totals[name] for name in sorted(totals)]


def select(measurements: Sequence[Measurement], model: str | None) -> list[Measurement]:
    """The measurements to report: `model` alone, else every model that made images."""
    if model is not None:
        chosen = [m for m in measurements if m.model == model]
        if not chosen:
            known = ", ".join(m.model for m in measurements) or "none"
            raise CostInputError(f"--model {model}: not in the measurement (models: {known})")
    else:
        chosen = list(measurements)
    usable = [m for m in chosen if m.images > 0 and m.engine_seconds > 0]
    if not usable:
        which = f" for model {model}" if model else ""
        raise CostInputError(NO_IMAGES.format(which=which))
    return usable


def measurements_from_results(path: Path, clients: int | None) -> list[Measurement]:
    """The measurement of one level of a `benchmarks/load.py --json FILE` results file.

    `clients` picks the level by its concurrency; None takes the highest, where batches are
    fullest (the engine seconds per image of a busy server).
    """
    hint = "write one with `.venv/bin/python benchmarks/load.py --json FILE`"
    try:
        document: Any = json.loads(path.read_text())
    except OSError as error:
        raise CostInputError(
            f"--results {path}: cannot read it ({error.strerror}); {hint}"
        ) from error
    except ValueError as error:
        raise CostInputError(f"--results {path}: not JSON ({error}); {hint}") from error
    try:
        model = str(document["model"])
        levels = {int(level["concurrency"]): level for level in document["levels"]}
    except (KeyError, TypeError, ValueError) as error:
        raise CostInputError(
            f"--results {path}: not a load benchmark's results (missing {error}); {hint}"
        ) from error
    if not levels:
        raise CostInputError(f"--results {path}: no concurrency levels; {hint}")
    chosen = max(levels) if clients is None else clients
    if chosen not in levels:
        raise CostInputError(
            f"--clients {clients}: not measured in {path} (levels: "
            f"{', '.join(str(n) for n in sorted(levels))})"
        )
    level = levels[chosen]
    try:
        images = int(level["completed_images"])
        seconds = float(level["engine_seconds"])
    except (KeyError, TypeError, ValueError) as error:
        raise CostInputError(
            f"--results {path}: level {chosen} lacks {error}; {hint} (a current version)"
        ) from error
    measured = document.get("measured", "date unknown")
    source = f"{path}, {chosen} client{'s' if chosen != 1 else ''}, measured {measured}"
    return [Measurement(model, images, seconds, source)]
