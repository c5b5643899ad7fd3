"""Timestamps as Replicate writes them: ISO 8601 in UTC with microseconds and a `Z`."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["iso8601"]


def iso8601(epoch_seconds: float) -> str:
    """`epoch_seconds` as e.g. `2024-05-01T12:00:00.123456Z`."""
    moment = datetime.fromtimestamp(epoch_seconds, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
