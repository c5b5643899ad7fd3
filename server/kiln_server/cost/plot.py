"""`kiln cost --plot`: cost per image against monthly volume, self-hosted and on Replicate."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kiln_server.atomic_files import write_atomic
from kiln_server.cost.render import usd
from kiln_server.cost.report import CostReport, gpus_needed, self_hosted_monthly_usd

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["plot_costs", "volume_range"]

# At most this many GPU steps are drawn as exact teeth; beyond, dense sampling shows them.
MAX_TEETH = 1000
SAMPLES = 1500


def volume_range(reports: Sequence[CostReport]) -> tuple[float, float]:
    """Monthly volumes to draw: 1k to 10M, widened to show every break-even and volume."""
    marks = [r.break_even_images_per_month for r in reports if r.self_hosting_can_win]
    marks += [r.at_volume.images_per_month for r in reports if r.at_volume is not None]
    low = min([1e3, *(m / 3 for m in marks)])
    high = max([1e7, *(m * 3 for m in marks)])
    return max(low, 1.0), high


def _volumes(capacity: float, low: float, high: float) -> list[float]:
    """Geometric samples, plus both sides of every GPU step so the sawtooth stays sharp."""
    import numpy as np

    points = set(np.geomspace(low, high, SAMPLES).tolist())
    first, last = gpus_needed(low, capacity), gpus_needed(high, capacity)
    if last - first <= MAX_TEETH:
        for gpus in range(first, last + 1):
            edge = gpus * capacity
            if low <= edge <= high:
                points.update((edge, edge * (1 + 1e-9)))
    return sorted(points)


def plot_costs(reports: Sequence[CostReport], path: Path) -> None:
    """Draw every report's curves into one PNG at `path` (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    buffer = io.BytesIO()
    figure, axes = plt.subplots(figsize=(9, 5.5), dpi=120)
    try:
        _draw(reports, axes, plt.rcParams["axes.prop_cycle"].by_key()["color"])
        figure.tight_layout()
        figure.savefig(buffer, format="png")
    finally:
        plt.close(figure)
    write_atomic(path, buffer.getvalue())


def _dollars(text: str) -> str:
    """`text` with its dollar signs shown as such, not read as matplotlib mathtext."""
    return text.replace("$", r"\$")


def _price(value: float) -> str:
    """An axis price without trailing zeros: $1, $0.01, $0.0005."""
    text = usd(value)
    return text.rstrip("0").rstrip(".") if "." in text else text


def _count(value: float) -> str:
    """An axis count the short way: 1k, 10k, 1M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def _draw(reports: Sequence[CostReport], axes: Axes, colors: list[str]) -> None:
    from matplotlib.ticker import FuncFormatter

    low, high = volume_range(reports)
    for index, report in enumerate(reports):
        color = colors[index % len(colors)]
        name = f"{report.model}: " if len(reports) > 1 else ""
        volumes = _volumes(report.capacity_images_per_month, low, high)
        costs = [
            self_hosted_monthly_usd(v, report.capacity_images_per_month, report.gpu_month_usd) / v
            for v in volumes
        ]
        axes.plot(volumes, costs, color=color, label=f"{name}self-hosted")
        axes.axhline(
            report.replicate_per_image_usd,
            color=color,
            linestyle="--",
            label=f"{name}Replicate {report.replicate_label}",
        )
        if report.self_hosting_can_win:
            axes.axvline(report.break_even_images_per_month, color=color, linestyle=":")
            # Labelled on the side with more room, so it stays inside the axes.
            right_half = report.break_even_images_per_month**2 > low * high
            axes.annotate(
                f"break-even\n{report.break_even_images_per_month:,.0f}/month",
                (report.break_even_images_per_month, report.replicate_per_image_usd),
                xytext=(-6 if right_half else 6, 12),
                textcoords="offset points",
                horizontalalignment="right" if right_half else "left",
                color=color,
                fontsize=8,
            )
        if report.at_volume is not None:
            volume = report.at_volume
            axes.plot(
                [volume.images_per_month],
                [volume.self_hosted_per_image_usd],
                marker="o",
                color=color,
                label=f"{name}--volume {volume.images_per_month:,}",
            )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlim(low, high)
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: _count(value)))
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: _dollars(_price(value))))
    axes.set_xlabel("images per month")
    axes.set_ylabel("cost per image (USD)")
    axes.grid(True, which="major", alpha=0.3)
    first = reports[0]
    prices = (
        f"self-hosted {usd(first.gpu_month_usd)}/GPU-month at {first.utilization:.0%} busy, "
        f"Replicate {first.replicate_label} ${first.replicate_usd_per_second:.6f}/s"
    )
    models = ", ".join(r.model for r in reports)
    axes.set_title(_dollars(f"Cost per image: {models}\n{prices}"), fontsize=10)
    axes.legend(fontsize=8, loc="upper right")
