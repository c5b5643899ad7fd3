"""`kiln cost`: the per-image cost report, from a server's metrics or a load benchmark's results.

The arithmetic is checked against a case computed by hand; the metrics path against the text
kiln_server.metrics.ServerMetrics really serves (through MetricsEndpoint, over HTTP); the
results path against what benchmarks/load.py really writes; and the command through argparse,
as a user runs it, bad inputs included. No model is loaded and no server process started.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image
from prometheus_client import generate_latest

from kiln_server.cost import cli
from kiln_server.cost.render import render_json, render_text, usd, verdict
from kiln_server.cost.report import (
    Measurement,
    Pricing,
    cost_report,
    gpus_needed,
    monthly_capacity,
)
from kiln_server.cost.sources import (
    CostInputError,
    fetch_metrics,
    measurements_from_metrics,
    merge,
    metrics_url,
    select,
)
from kiln_server.metrics import MetricsEndpoint, ServerMetrics

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_kiln_cost(*argv: str) -> int:
    """Run `kiln cost ARGV` through a `kiln`-style parser with subparsers, as the CLI does."""
    parser = argparse.ArgumentParser(prog="kiln")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["cost", *argv])
    return int(args.handler(args))


def served_metrics() -> ServerMetrics:
    """A server's metrics after a few completed requests: model `a` made 5 images, `b` none."""
    metrics = ServerMetrics()
    metrics.declare_models(["a", "b"])
    metrics.request_completed("a", 1, queue_seconds=0.1, inference_seconds=2.0, engine_seconds=1.5)
    metrics.request_completed("a", 4, queue_seconds=0.3, inference_seconds=5.0, engine_seconds=4.5)
    metrics.request_ended("a", "completed")
    metrics.request_ended("a", "completed")
    return metrics


@pytest.fixture
def endpoint() -> Iterator[MetricsEndpoint]:
    """served_metrics() on a real /metrics endpoint on a free loopback port."""
    server = MetricsEndpoint(served_metrics(), "127.0.0.1", 0)
    yield server
    server.close()


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- the arithmetic ------------------------------------------------------------------------

# By hand: 2.0 engine s/image at 50% busy -> 30 x 86,400 x 0.5 / 2 = 648,000 images a month;
# $648 a month / 648,000 = $0.001 per image; Replicate 2.0 s x $0.001/s = $0.002 per image;
# break-even $648 / $0.002 = 324,000 images a month; 1,000,000 images need ceil(1.54) = 2 GPUs
# = $1,296 ($0.001296 per image) against 1,000,000 x $0.002 = $2,000 on Replicate.
HAND = Measurement("sdxl", images=10, engine_seconds=20.0, source="hand")
HAND_PRICING = Pricing(
    gpu_month_usd=648.0,
    replicate_label="custom",
    replicate_usd_per_second=0.001,
    utilization=0.5,
    volume=1_000_000,
)


def test_hand_computed_case() -> None:
    report = cost_report(HAND, HAND_PRICING)
    assert report.engine_seconds_per_image == 2.0
    assert report.capacity_images_per_month == 648_000
    assert report.self_hosted_per_image_at_capacity_usd == pytest.approx(0.001)
    assert report.replicate_seconds_per_image == 2.0
    assert report.replicate_seconds_measured
    assert report.replicate_per_image_usd == pytest.approx(0.002)
    assert report.break_even_images_per_month == pytest.approx(324_000)
    assert report.self_hosting_can_win
    volume = report.at_volume
    assert volume is not None
    assert volume.gpus == 2
    assert volume.self_hosted_monthly_usd == 1296.0
    assert volume.self_hosted_per_image_usd == pytest.approx(0.001296)
    assert volume.replicate_monthly_usd == pytest.approx(2000.0)
    assert volume.saving_monthly_usd == pytest.approx(704.0)
    assert verdict(report) == (
        "Self-hosting is cheaper at 1,000,000 images a month: $1,296.00 a month on 2 GPUs "
        "against $2,000.00 on Replicate, saving $704.00."
    )


def test_gpus_step_exactly_at_capacity() -> None:
    capacity = monthly_capacity(2.0, 0.5)
    assert gpus_needed(1, capacity) == 1
    assert gpus_needed(648_000, capacity) == 1
    assert gpus_needed(648_001, capacity) == 2
    assert gpus_needed(3 * 648_000, capacity) == 3


def test_hosted_seconds_per_image_override_and_replicate_cheaper_below_break_even() -> None:
    pricing = Pricing(648.0, "custom", 0.001, replicate_seconds_per_image=5.0, utilization=0.5,
                      volume=100_000)  # fmt: skip
    report = cost_report(HAND, pricing)
    assert report.replicate_per_image_usd == pytest.approx(0.005)
    assert not report.replicate_seconds_measured
    assert report.break_even_images_per_month == pytest.approx(129_600)
    assert report.at_volume is not None and report.at_volume.gpus == 1
    assert verdict(report).startswith("Replicate is cheaper at 100,000 images a month: $648.00")
    assert "self-hosting pays from 129,600 images a month" in verdict(report)


def test_replicate_cheaper_at_any_volume() -> None:
    # $5,000 a month for 648,000 images: $0.0077 each, above Replicate's $0.002.
    report = cost_report(HAND, Pricing(5000.0, "custom", 0.001, utilization=0.5))
    assert not report.self_hosting_can_win
    assert report.at_volume is None
    assert verdict(report).startswith("Replicate is cheaper at any volume")


def test_usd_reads_like_money() -> None:
    assert usd(1296) == "$1,296.00"
    assert usd(0.001296) == "$0.00130"
    assert usd(0.000025) == "$0.0000250"
    assert usd(0) == "$0.00"


# --- reading the measurement ---------------------------------------------------------------


def test_metrics_text_from_server_metrics_per_model() -> None:
    text = generate_latest(served_metrics().registry).decode()
    measurements = measurements_from_metrics(text, "test")
    by_model = {m.model: m for m in measurements}
    assert by_model["a"] == Measurement("a", 5, 6.0, "test")
    assert by_model["b"].images == 0
    assert select(measurements, None) == [by_model["a"]]
    assert select(measurements, "a")[0].seconds_per_image == pytest.approx(1.2)
    with pytest.raises(CostInputError, match="no images generated yet for model b"):
        select(measurements, "b")
    with pytest.raises(CostInputError, match=r"--model c: not in the measurement \(models: a, b\)"):
        select(measurements, "c")


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ("127.0.0.1:9109", "http://127.0.0.1:9109/metrics"),
        ("http://kiln-0.kiln:9109", "http://kiln-0.kiln:9109/metrics"),
        ("https://kiln.example/custom/path", "https://kiln.example/custom/path"),
    ],
)
def test_metrics_url_completes_what_is_left_out(given: str, url: str) -> None:
    assert metrics_url(given) == url


def test_replicas_add_up_per_model() -> None:
    one = [Measurement("a", 5, 6.0, "r0"), Measurement("b", 0, 0.0, "r0")]
    two = [Measurement("a", 3, 3.0, "r1")]
    assert merge([one, two]) == [Measurement("a", 8, 9.0, "r0 + r1"), one[1]]


def test_metrics_without_kiln_engine_seconds_are_refused() -> None:
    with pytest.raises(CostInputError, match="has no kiln_engine_seconds_total"):
        measurements_from_metrics("# TYPE other counter\nother_total 3\n", "http://x/metrics")


def test_fetch_from_a_real_metrics_endpoint(endpoint: MetricsEndpoint) -> None:
    text = fetch_metrics(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=5)
    assert {m.model: m.images for m in measurements_from_metrics(text, "x")} == {"a": 5, "b": 0}


def load_module() -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("load")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_results_file_written_by_the_load_benchmark(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    load = load_module()
    levels = [
        load.RunResult(1, 10, 10, 5.0, [0.5] * 10, [0.0] * 10, 2.0, 0, 4.0, 10),
        load.RunResult(8, 40, 40, 5.0, [1.0] * 40, [0.1] * 40, 15.0, 0, 8.0, 40),
    ]
    args = argparse.Namespace(
        model="kiln-shapes", backend=None, steps=0, num_outputs=1, max_batch_rows=16,
        intra_op_threads=1,
    )  # fmt: skip
    results = tmp_path / "load.json"
    results.write_text(json.dumps(load.results_document(levels, args)))

    assert run_kiln_cost("--results", str(results), "--gpu-month-price", "600", "--json") == 0
    report = json.loads(capsys.readouterr().out)["reports"][0]
    assert report["model"] == "kiln-shapes"
    assert report["engine_seconds_per_image"] == pytest.approx(0.2)  # the 8-client level
    assert "8 clients" in report["source"]

    assert run_kiln_cost("--results", str(results), "--clients", "1", "--gpu-month-price",
                         "600", "--json") == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["reports"][0]["engine_seconds_per_image"] == 0.4

    assert run_kiln_cost("--results", str(results), "--clients", "4", "--gpu-month-price",
                         "600") == 2  # fmt: skip
    assert "--clients 4: not measured" in capsys.readouterr().err


# --- the command ---------------------------------------------------------------------------


def test_command_on_a_live_endpoint(
    endpoint: MetricsEndpoint, capsys: pytest.CaptureFixture[str]
) -> None:
    status = run_kiln_cost(
        "--metrics", f"127.0.0.1:{endpoint.port}", "--gpu-month-price", "600",
        "--replicate-gpu", "L40S", "--volume", "100k",
    )  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0
    assert out.startswith(f"a: 5 images in 6.00 engine seconds (http://127.0.0.1:{endpoint.port}")
    # 1.2 s/image at 70%: 1,512,000 images a month; L40S: 1.2 x $0.000975 = $0.00117.
    assert "1,512,000 images/month at 70% busy" in out
    assert "$0.00117" in out
    assert re.search(r"monthly cost at 100,000 images/month +\$600\.00 \(1 GPU\) +\$117\.00", out)
    assert "break-even on one GPU" in out and "512,821 images/month" in out
    assert "Replicate is cheaper at 100,000 images a month" in out
    assert "\nb:" not in out  # no images, nothing to report


def test_the_kiln_command_runs_cost(
    endpoint: MetricsEndpoint, capsys: pytest.CaptureFixture[str]
) -> None:
    from kiln_client.cli import main

    url = f"http://127.0.0.1:{endpoint.port}/metrics"
    assert (
        main(["cost", "--metrics", url, "--model", "a", "--gpu-month-price", "600", "--json"]) == 0
    )
    (report,) = json.loads(capsys.readouterr().out)["reports"]
    assert (report["model"], report["images"], report["source"]) == ("a", 5, url)


def test_json_output_has_every_figure() -> None:
    report = cost_report(Measurement("a", 5, 6.0, "x"), HAND_PRICING)
    document = json.loads(render_json([report]))["reports"][0]
    assert document["capacity_images_per_month"] == pytest.approx(1_080_000)
    assert document["at_volume"]["gpus"] == 1
    assert document["verdict"] == verdict(report)
    assert "engine seconds" in render_text([report]).lower()


def test_unreachable_metrics_url(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}/metrics"
    assert run_kiln_cost("--metrics", url, "--gpu-month-price", "600", "--timeout", "2") == 2
    err = capsys.readouterr().err
    assert f"kiln cost: --metrics {url}: cannot connect" in err
    assert "kiln serve --metrics-port" in err


def test_no_images_yet(capsys: pytest.CaptureFixture[str]) -> None:
    metrics = ServerMetrics()
    metrics.declare_models(["a"])
    server = MetricsEndpoint(metrics, "127.0.0.1", 0)
    try:
        status = run_kiln_cost("--metrics", f"127.0.0.1:{server.port}", "--gpu-month-price", "1")
    finally:
        server.close()
    assert status == 2
    assert capsys.readouterr().err == (
        "kiln cost: no images generated yet: send some requests or run benchmarks/load.py first\n"
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--gpu-month-price", "-5"], "argument --gpu-month-price: '-5': give a price"),
        (["--gpu-month-price", "nan"], "argument --gpu-month-price: 'nan': give a price"),
        (["--gpu-month-price", "9", "--utilization", "1.5"], "argument --utilization: '1.5'"),
        (["--gpu-month-price", "9", "--volume", "0"], "argument --volume: '0': give a whole"),
        (["--gpu-month-price", "9", "--replicate-gpu", "v100"], "argument --replicate-gpu"),
        (["--gpu-month-price", "9", "--replicate-price-per-second", "0"], "per-second: '0'"),
        ([], "the following arguments are required: --gpu-month-price"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        run_kiln_cost("--metrics", "127.0.0.1:1", *flags)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_results_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "none.json"
    assert run_kiln_cost("--results", str(missing), "--gpu-month-price", "600") == 2
    err = capsys.readouterr().err
    assert f"--results {missing}: cannot read it" in err and "benchmarks/load.py --json" in err


def test_plot_writes_a_png(
    tmp_path: Path, endpoint: MetricsEndpoint, capsys: pytest.CaptureFixture[str]
) -> None:
    plot = tmp_path / "plots" / "cost.png"
    status = run_kiln_cost(
        "--metrics", f"127.0.0.1:{endpoint.port}", "--gpu-month-price", "300",
        "--volume", "2M", "--plot", str(plot),
    )  # fmt: skip
    assert status == 0
    assert f"Plot: {plot}" in capsys.readouterr().out
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(plot) as image:
        assert image.format == "PNG"
        assert image.width >= 800 and image.height >= 500
