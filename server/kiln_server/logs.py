"""Structured logs: one JSON object per line off a terminal, readable text on one.

Every record may carry `request_id` (pass `extra={"request_id": ...}`); other extras named
in STRUCTURED_FIELDS are copied into the JSON object too.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

STRUCTURED_FIELDS = (
    "request_id",
    "model",
    "backend",
    "port",
    "metrics_port",
    "health_port",
    "seconds",
    "steps",
    "rows",
    "jobs",
    "status",
    "in_flight",
    "path",
    "pid",
    "threads",
    "placement",
    "why",
    "limits",
    "component",
    "shapes",
    "lora",
    "ok",
    "bytes",
    "budget",
    "unloaded",
)


LIBRARY_LOGGERS = ("diffusers", "transformers", "huggingface_hub", "httpx")


class JsonFormatter(logging.Formatter):
    """Formats a record as a single-line JSON object."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in STRUCTURED_FIELDS:
            if hasattr(record, name):
                payload[name] = getattr(record, name)
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines with structured fields appended as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} {record.getMessage()}"
        extras = [f"{n}={getattr(record, n)}" for n in STRUCTURED_FIELDS if hasattr(record, n)]
        if extras:
            line += "  " + " ".join(extras)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def adopt_library_logging(libraries: tuple[str, ...]) -> None:
    """Make `libraries` (transformers, diffusers) log through the root handler only.

    Each installs a plain-text stderr handler of its own on first use and stops
    propagation, which would put text lines into JSON logs; importing their logging module
    now lets Kiln remove that handler before anything is logged through it.
    """
    import importlib

    for name in libraries:
        module = importlib.import_module(f"{name}.utils.logging")
        module.disable_default_handler()
        module.enable_propagation()


def configure_logging(
    log_format: str = "auto", level: str = "INFO", libraries: tuple[str, ...] = ()
) -> None:
    """Send Kiln's logs to stderr in the chosen format ('auto': JSON unless on a terminal),
    the `libraries`' logs and Python warnings included."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Python warnings become log records, so JSON logs hold nothing but JSON.
    logging.captureWarnings(True)
    adopt_library_logging(libraries)
    # Libraries' chatter (config notices, progress bars) is not service telemetry.
    for noisy in LIBRARY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)
