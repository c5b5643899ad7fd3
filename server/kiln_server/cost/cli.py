"""`kiln cost`: cost per image from measured engine seconds, against Replicate's price."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from kiln_server.cost.prices import (
    REPLICATE_HARDWARE,
    REPLICATE_PRICES_READ,
    REPLICATE_PRICES_SOURCE,
)

__all__ = ["register", "run_cost"]

DEFAULT_REPLICATE_GPU = "l40s"
DEFAULT_UTILIZATION = 0.7

DESCRIPTION = """\
What one image costs on your own GPU, measured, against Replicate's per-second price.

Engine seconds and images come from a running server's /metrics (kiln_engine_seconds_total
and kiln_images_total, totals since it started) or from a load benchmark's results. Engine
seconds are the engine core's time for completed requests: prompt encoding, denoising steps,
previews and VAE decode; a batched step's time is shared among its requests by their rows, so
engine seconds per image fall as batches fill. Measure under the load you expect to serve.

One GPU makes 30 days x 86,400 s x --utilization / (engine seconds per image) images a month;
a volume needs ceil(volume / that) GPUs, each at --gpu-month-price. Replicate charges its
per-second hardware price for each image's run time. Break-even: the monthly volume from
which one GPU costs less than Replicate (--gpu-month-price / Replicate's price per image).
"""


def _epilog() -> str:
    rows = "\n".join(
        f"  {name:<10} {gpu.label:<12} {gpu.hardware:<15} ${gpu.usd_per_second:.6f}/s"
        for name, gpu in REPLICATE_HARDWARE.items()
    )
    return (
        f"Replicate prices (--replicate-gpu), read {REPLICATE_PRICES_READ} from "
        f"{REPLICATE_PRICES_SOURCE}:\n{rows}\n\n"
        "examples:\n"
        "  kiln cost --metrics http://127.0.0.1:9109/metrics --gpu-month-price 600 "
        "--volume 100k\n"
        "  kiln cost --results load.json --gpu-month-price 1200 --replicate-gpu h100 "
        "--plot cost.png\n\n"
        "Exit status: 0 on success, 2 when an input is wrong or cannot be read (the message "
        "names it)."
    )


def positive_usd(text: str) -> float:
    """A price in US dollars, finite and above zero (argparse type)."""
    return _positive(text, "a price in US dollars above 0, e.g. 600 or 0.000975")


def positive_seconds(text: str) -> float:
    """A duration in seconds above zero (argparse type)."""
    return _positive(text, "seconds above 0, e.g. 2.5")


def _positive(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number: give {what}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give {what}")
    return value


def utilization(text: str) -> float:
    """A share of the month a GPU is busy: 0 < u <= 1 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a share of the month above 0 and at most 1, e.g. 0.7"
        )
    return value


def volume(text: str) -> int:
    """Images per month, at least 1; accepts 180000, 180_000, 180,000, 180k and 1.5M."""
    cleaned = text.strip().replace(",", "").replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(cleaned[-1:].lower(), 1)
    number = cleaned[:-1] if scale > 1 else cleaned
    try:
        value = float(number) * scale
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1 and value == int(value)):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a whole number of images a month, at least 1, e.g. 180000 or 180k"
        )
    return int(value)


def count(text: str) -> int:
    """A whole number of at least 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return value


def register(subparsers: Any) -> None:
    """Add the `cost` subcommand to the `kiln` parser (matplotlib loads only for --plot)."""
    parser = subparsers.add_parser(
        "cost",
        help="cost per image from measured engine seconds, against Replicate's price",
        description=DESCRIPTION,
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--metrics",
        metavar="URL",
        action="append",
        help="a running server's Prometheus endpoint (`kiln serve --metrics-port P`), e.g. "
        "http://127.0.0.1:9109/metrics or 127.0.0.1:9109; repeat it to add up replicas",
    )
    source.add_argument(
        "--results",
        metavar="FILE",
        type=Path,
        help="a load benchmark's results: `benchmarks/load.py --json FILE`",
    )
    parser.add_argument(
        "--clients",
        metavar="N",
        type=count,
        help="with --results: the concurrency level to use (default: the highest measured, "
        "where batches are fullest)",
    )
    parser.add_argument(
        "--model", metavar="NAME", help="report this model only (default: every model with images)"
    )
    parser.add_argument(
        "--gpu-month-price",
        metavar="USD",
        type=positive_usd,
        required=True,
        help="what one GPU costs you a month, all in: rent, or purchase spread over its life "
        "plus power and hosting",
    )
    parser.add_argument(
        "--utilization",
        metavar="U",
        type=utilization,
        default=DEFAULT_UTILIZATION,
        help="share of the month a GPU is generating, 0 < U <= 1 (default "
        f"{DEFAULT_UTILIZATION}: traffic is uneven and a GPU is never busy all the time); "
        "it scales one GPU's monthly capacity",
    )
    parser.add_argument(
        "--volume",
        metavar="N",
        type=volume,
        help="images a month to price both sides at (e.g. 180000 or 180k): GPUs needed, "
        "monthly bills, cost per image",
    )
    replicate = parser.add_mutually_exclusive_group()
    replicate.add_argument(
        "--replicate-gpu",
        metavar="NAME",
        type=str.lower,
        choices=sorted(REPLICATE_HARDWARE),
        help=f"Replicate hardware whose per-second price to compare with: "
        f"{', '.join(REPLICATE_HARDWARE)} (default {DEFAULT_REPLICATE_GPU}; prices below)",
    )
    replicate.add_argument(
        "--replicate-price-per-second",
        metavar="USD",
        type=positive_usd,
        help="Replicate's price per second of run time, instead of --replicate-gpu's",
    )
    parser.add_argument(
        "--replicate-seconds-per-image",
        metavar="S",
        type=positive_seconds,
        help="seconds Replicate bills per image (default: the measured engine seconds per "
        "image, i.e. as fast as this server; a hosted prediction's billed time is usually "
        "longer: take it from a prediction's metrics.predict_time)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        type=Path,
        help="also draw cost per image against monthly volume, both sides, into this PNG",
    )
    parser.add_argument(
        "--timeout",
        metavar="S",
        type=positive_seconds,
        default=10.0,
        help="seconds to wait for --metrics (default 10)",
    )
    parser.set_defaults(handler=run_cost)


def run_cost(args: argparse.Namespace) -> int:
    """Read the measurement, price it, print the report (and draw it); 2 on a bad input."""
    from kiln_server.cost.render import render_json, render_text
    from kiln_server.cost.report import Pricing, cost_report
    from kiln_server.cost.sources import (
        CostInputError,
        fetch_metrics,
        measurements_from_metrics,
        measurements_from_results,
        merge,
        metrics_url,
        select,
    )

    try:
        if args.results is not None:
            measurements = measurements_from_results(args.results, args.clients)
        else:
            if args.clients is not None:
                raise CostInputError("--clients: only with --results (a load benchmark's levels)")
            urls = [metrics_url(address) for address in args.metrics]
            measurements = merge(
                [measurements_from_metrics(fetch_metrics(url, args.timeout), url) for url in urls]
            )
        chosen = select(measurements, args.model)
    except CostInputError as error:
        print(f"kiln cost: {error}", file=sys.stderr)
        return 2
    if args.replicate_price_per_second is not None:
        label, per_second = "custom", args.replicate_price_per_second
    else:
        gpu = REPLICATE_HARDWARE[args.replicate_gpu or DEFAULT_REPLICATE_GPU]
        label, per_second = gpu.label, gpu.usd_per_second
    pricing = Pricing(
        gpu_month_usd=args.gpu_month_price,
        replicate_label=label,
        replicate_usd_per_second=per_second,
        replicate_seconds_per_image=args.replicate_seconds_per_image,
        utilization=args.utilization,
        volume=args.volume,
    )
    reports = [cost_report(measurement, pricing) for measurement in chosen]
    if args.plot is not None:
        from kiln_server.cost.plot import plot_costs

        try:
            plot_costs(reports, args.plot)
        except OSError as error:
            print(f"kiln cost: --plot {args.plot}: cannot write it ({error})", file=sys.stderr)
            return 2
    if args.json:
        sys.stdout.write(render_json(reports))
    else:
        sys.stdout.write(render_text(reports))
        if args.plot is not None:
            print(f"\nPlot: {args.plot}")
    return 0
