"""The arithmetic of `kiln cost`: measured engine seconds and prices in, cost per image out.

Self-hosted: a GPU costs a fixed price per month however much it works, and makes at most
`capacity` images a month (a 30-day month, times the share of it the GPU can be kept busy,
divided by engine seconds per image). Serving a volume takes ceil(volume / capacity) GPUs.
Replicate: every image costs its run time times the hardware's price per second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "MONTH_SECONDS",
    "CostReport",
    "Measurement",
    "Pricing",
    "VolumeCost",
    "cost_report",
    "gpus_needed",
    "monthly_capacity",
    "self_hosted_monthly_usd",
]

MONTH_SECONDS = 30 * 24 * 3600


@dataclass(frozen=True)
class Measurement:
    """Engine seconds and images of one model, as measured, and where they were read."""

    model: str
    images: int
    engine_seconds: float
    source: str

    @property
    def seconds_per_image(self) -> float:
        """Engine seconds per image: engine seconds / images."""
        return self.engine_seconds / self.images


@dataclass(frozen=True)
class Pricing:
    """The prices and assumptions a report is computed with (all validated by the caller).

    `replicate_seconds_per_image` None means: the measured engine seconds per image (the
    hosted run as fast as this server). `volume` None leaves the monthly figures out.
    """

    gpu_month_usd: float
    replicate_label: str
    replicate_usd_per_second: float
    replicate_seconds_per_image: float | None = None
    utilization: float = 0.7
    volume: int | None = None


@dataclass(frozen=True)
class VolumeCost:
    """Both sides' monthly bill at one monthly volume."""

    images_per_month: int
    gpus: int
    self_hosted_monthly_usd: float
    self_hosted_per_image_usd: float
    replicate_monthly_usd: float
    # What self-hosting saves a month (negative: what it costs more than Replicate).
    saving_monthly_usd: float


@dataclass(frozen=True)
class CostReport:
    """Every figure of one model's cost report; `asdict` of it is the `--json` output."""

    model: str
    source: str
    images: int
    engine_seconds: float
    engine_seconds_per_image: float
    utilization: float
    capacity_images_per_month: float
    gpu_month_usd: float
    self_hosted_per_image_at_capacity_usd: float
    replicate_label: str
    replicate_usd_per_second: float
    replicate_seconds_per_image: float
    replicate_seconds_measured: bool
    replicate_per_image_usd: float
    break_even_images_per_month: float
    at_volume: VolumeCost | None

    @property
    def self_hosting_can_win(self) -> bool:
        """Whether a GPU at capacity makes images for less than Replicate charges for them."""
        return self.break_even_images_per_month < self.capacity_images_per_month


def monthly_capacity(seconds_per_image: float, utilization: float) -> float:
    """Images one GPU makes in a 30-day month when busy `utilization` of the time."""
    return MONTH_SECONDS * utilization / seconds_per_image


def gpus_needed(volume: float, capacity: float) -> int:
    """GPUs it takes to make `volume` images a month at `capacity` each (at least one)."""
    # The tolerance keeps a volume of exactly k GPUs' capacity at k despite rounding.
    return max(1, math.ceil(volume / capacity - 1e-9))


def self_hosted_monthly_usd(volume: float, capacity: float, gpu_month_usd: float) -> float:
    """The monthly bill of the GPUs that `volume` images a month need."""
    return gpus_needed(volume, capacity) * gpu_month_usd


def cost_report(measurement: Measurement, pricing: Pricing) -> CostReport:
    """Every figure of the report for one model's measurement under `pricing`."""
    seconds = measurement.seconds_per_image
    capacity = monthly_capacity(seconds, pricing.utilization)
    hosted_seconds = pricing.replicate_seconds_per_image
    if hosted_seconds is None:
        hosted_seconds = seconds
    replicate_per_image = hosted_seconds * pricing.replicate_usd_per_second
    at_volume = None
    if pricing.volume is not None:
        monthly = self_hosted_monthly_usd(pricing.volume, capacity, pricing.gpu_month_usd)
        hosted_monthly = pricing.volume * replicate_per_image
        at_volume = VolumeCost(
            images_per_month=pricing.volume,
            gpus=gpus_needed(pricing.volume, capacity),
            self_hosted_monthly_usd=monthly,
            self_hosted_per_image_usd=monthly / pricing.volume,
            replicate_monthly_usd=hosted_monthly,
            saving_monthly_usd=hosted_monthly - monthly,
        )
    return CostReport(
        model=measurement.model,
        source=measurement.source,
        images=measurement.images,
        engine_seconds=measurement.engine_seconds,
        engine_seconds_per_image=seconds,
        utilization=pricing.utilization,
        capacity_images_per_month=capacity,
        gpu_month_usd=pricing.gpu_month_usd,
        self_hosted_per_image_at_capacity_usd=pricing.gpu_month_usd / capacity,
        replicate_label=pricing.replicate_label,
        replicate_usd_per_second=pricing.replicate_usd_per_second,
        replicate_seconds_per_image=hosted_seconds,
        replicate_seconds_measured=pricing.replicate_seconds_per_image is None,
        replicate_per_image_usd=replicate_per_image,
        break_even_images_per_month=pricing.gpu_month_usd / replicate_per_image,
        at_volume=at_volume,
    )
