"""`kiln cost`'s output: a table per model for people, JSON for machines."""

from __future__ import annotations

import dataclasses
import json
import math
import textwrap
from collections.abc import Sequence
from typing import Any

from kiln_server.cost.report import CostReport

__all__ = ["render_json", "render_text", "usd", "verdict"]

WIDTH = 92  # of the verdict and the note under the tables

ENGINE_SECONDS_NOTE = (
    "Engine seconds: the engine time of completed requests (prompt encoding, denoising steps, "
    "previews, VAE decode); a batched step's time is shared among its requests by rows, so "
    "the figure falls as batches fill. Queue, image encoding and idle time are not in it."
)


def usd(amount: float) -> str:
    """Dollars as people read them: cents from $1 up, three significant digits below."""
    if abs(amount) >= 1 or amount == 0:
        return f"${amount:,.2f}"
    decimals = 2 - math.floor(math.log10(abs(amount)))
    return f"${amount:.{decimals}f}"


def verdict(report: CostReport) -> str:
    """One sentence to decide on: which side is cheaper, from which volume, by how much."""
    break_even = f"{report.break_even_images_per_month:,.0f}"
    capacity = f"{report.capacity_images_per_month:,.0f}"
    if not report.self_hosting_can_win:
        return (
            f"Replicate is cheaper at any volume: even at capacity, a GPU costs "
            f"{usd(report.self_hosted_per_image_at_capacity_usd)} per image against "
            f"{usd(report.replicate_per_image_usd)} (break-even, {break_even} images a month, "
            f"is past the {capacity} one GPU makes)."
        )
    pays = (
        f"self-hosting pays from {break_even} images a month on one GPU (it makes up to {capacity})"
    )
    volume = report.at_volume
    if volume is None:
        return pays[0].upper() + pays[1:] + "."
    gpus = f"{volume.gpus} GPU{'s' if volume.gpus > 1 else ''}"
    bills = (
        f"{usd(volume.self_hosted_monthly_usd)} a month on {gpus} against "
        f"{usd(volume.replicate_monthly_usd)} on Replicate"
    )
    at = f"at {volume.images_per_month:,} images a month"
    if volume.saving_monthly_usd > 0:
        return f"Self-hosting is cheaper {at}: {bills}, saving {usd(volume.saving_monthly_usd)}."
    return f"Replicate is cheaper {at}: {bills}; {pays}."


def render_text(reports: Sequence[CostReport]) -> str:
    """The human report: one two-column table (self-hosted, Replicate) per model."""
    return (
        "\n\n".join([*(_table(r) for r in reports), textwrap.fill(ENGINE_SECONDS_NOTE, WIDTH)])
        + "\n"
    )


def _table(r: CostReport) -> str:
    hosted_speed = (
        "same as measured" if r.replicate_seconds_measured else "--replicate-seconds-per-image"
    )
    rows: list[tuple[str, str, str]] = [
        (
            "seconds per image",
            f"{r.engine_seconds_per_image:.4g} (engine)",
            f"{r.replicate_seconds_per_image:.4g} ({hosted_speed})",
        ),
        (
            "price",
            f"{usd(r.gpu_month_usd)} per GPU-month",
            f"{r.replicate_label}, ${r.replicate_usd_per_second:.6f}/s",
        ),
        (
            "one GPU makes",
            f"{r.capacity_images_per_month:,.0f} images/month at {r.utilization:.0%} busy",
            "",
        ),
        (
            "cost per image",
            f"{usd(r.self_hosted_per_image_at_capacity_usd)} (one GPU at capacity)",
            usd(r.replicate_per_image_usd),
        ),
    ]
    volume = r.at_volume
    if volume is not None:
        at = f"{volume.images_per_month:,} images/month"
        gpus = f"{volume.gpus} GPU{'s' if volume.gpus > 1 else ''}"
        rows += [
            (
                f"cost per image at {at}",
                usd(volume.self_hosted_per_image_usd),
                usd(r.replicate_per_image_usd),
            ),
            (
                f"monthly cost at {at}",
                f"{usd(volume.self_hosted_monthly_usd)} ({gpus})",
                usd(volume.replicate_monthly_usd),
            ),
        ]
    rows.append(("break-even on one GPU", f"{r.break_even_images_per_month:,.0f} images/month", ""))
    header = (
        f"{r.model}: {r.images:,} images in {r.engine_seconds:,.2f} engine seconds ({r.source})"
    )
    width = [max(len(row[i]) for row in [("", "self-hosted", "Replicate"), *rows]) for i in (0, 1)]
    lines = [header, ""]
    for label, mine, hosted in [("", "self-hosted", "Replicate"), *rows]:
        lines.append(f"  {label:<{width[0]}}  {mine:<{width[1]}}  {hosted}".rstrip())
    lines += ["", textwrap.fill(verdict(r), WIDTH)]
    return "\n".join(lines)


def render_json(reports: Sequence[CostReport]) -> str:
    """The machine report: every figure of every model, plus each verdict."""
    documents: list[dict[str, Any]] = []
    for report in reports:
        document = dataclasses.asdict(report)
        document["self_hosting_can_win"] = report.self_hosting_can_win
        document["verdict"] = verdict(report)
        documents.append(document)
    return (
        json.dumps({"reports": documents, "engine_seconds": ENGINE_SECONDS_NOTE}, indent=2) + "\n"
    )
