"""Replicate's published per-second hardware prices: the hosted side of `kiln cost`.

One table, with where and when each price was read. Prices change: `--replicate-price-per-
second` overrides the table, and a stale row should be updated here, not patched elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "REPLICATE_HARDWARE",
    "REPLICATE_PRICES_READ",
    "REPLICATE_PRICES_SOURCE",
    "ReplicateHardware",
]

REPLICATE_PRICES_SOURCE = "https://replicate.com/pricing"
REPLICATE_PRICES_READ = "2026-11-30"


@dataclass(frozen=True)
class ReplicateHardware:
    """One hardware choice on Replicate: its name there and its price per second of run time."""

    label: str
    hardware: str
    usd_per_second: float


# Key: the `--replicate-gpu` name. Single-GPU rows only: one image runs on one GPU. `cpu`
# prices a server that runs on the CPU (`kiln serve --device cpu`) against Replicate's CPU.
REPLICATE_HARDWARE: dict[str, ReplicateHardware] = {
    "cpu": ReplicateHardware("CPU", "cpu", 0.000100),
    "t4": ReplicateHardware("T4", "gpu-t4", 0.000225),
    "a40": ReplicateHardware("A40", "gpu-a40-small", 0.000575),
    "a40-large": ReplicateHardware("A40 (Large)", "gpu-a40-large", 0.000725),
    "l40s": ReplicateHardware("L40S", "gpu-l40s", 0.000975),
    "a100-80gb": ReplicateHardware("A100 (80GB)", "gpu-a100-large", 0.001400),
    "h100": ReplicateHardware("H100", "gpu-h100", 0.001525),
}
