"""`kiln generate` and `kiln models` against an in-process fake Kiln server."""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from test_client_support import (
    Abort,
    FakeKiln,
    Hang,
    bad_request,
    closed_port_address,
    completed,
    image,
    progress,
    queue_full,
    queued,
    running_fake_server,
    started,
)

from kiln_client import generate_cli
from kiln_client.generate_cli import ProgressReporter, output_path
from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.results import GeneratedImage


@pytest.fixture
def kiln() -> Iterator[FakeKiln]:
    with running_fake_server() as fake:
        yield fake


def run_cli(*argv: str) -> int:
    """Parse argv the way the `kiln` dispatcher does and run the chosen handler."""
    parser = argparse.ArgumentParser(prog="kiln")
    subparsers = parser.add_subparsers(dest="command", required=True)
    generate_cli.register(subparsers)
    args = parser.parse_args(argv)
    return int(args.handler(args))


def test_outputs_follow_the_naming_rule_and_seeds_are_printed(
    kiln: FakeKiln, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kiln.service.script = [
        queued(0),
        started(seed=1234, num_outputs=2),
        progress(1),
        progress(2),
        image(0, 1234, b"png-0"),
        image(1, 1235, b"png-1"),
        completed(num_images=2),
    ]
    out = tmp_path / "teapot.png"
    code = run_cli(
        "generate", "a teapot", "--server", kiln.address, "--out", str(out),
        "--num-outputs", "2", "--seed", "1234", "--steps", "2", "--width", "64",
        "--height", "64", "--priority", "high",
    )  # fmt: skip
    assert code == 0
    assert out.read_bytes() == b"png-0"
    assert (tmp_path / "teapot-1.png").read_bytes() == b"png-1"
    stdout = capsys.readouterr().out.splitlines()
    assert stdout == [
        f"wrote {tmp_path / 'teapot.png'} (seed 1234)",
        f"wrote {tmp_path / 'teapot-1.png'} (seed 1235)",
    ]
    sent = kiln.service.requests[0]
    assert (sent.prompt, sent.num_outputs, sent.seed, sent.num_inference_steps) == (
        "a teapot", 2, 1234, 2,
    )  # fmt: skip
    assert (sent.width, sent.height, sent.priority) == (64, 64, pb.PRIORITY_HIGH)
    assert sent.output_format == pb.OUTPUT_FORMAT_PNG
    assert not sent.HasField("preview")


def test_default_output_name_uses_the_seed_and_format(
    kiln: FakeKiln, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KILN_SERVER", kiln.address)  # no --server: the env var decides
    kiln.service.script = [image(0, 42, b"webp-bytes", "image/webp"), completed()]
    assert run_cli("generate", "a teapot", "--format", "webp") == 0
    assert (tmp_path / "kiln-42.webp").read_bytes() == b"webp-bytes"
    assert kiln.service.requests[0].output_format == pb.OUTPUT_FORMAT_WEBP
    assert not kiln.service.requests[0].HasField("seed")


@pytest.mark.parametrize(
    ("out", "index", "mime", "expected"),
    [
        ("teapot.png", 0, "image/png", "teapot.png"),
        ("teapot.png", 2, "image/png", "teapot-2.png"),
        ("teapot", 0, "image/jpeg", "teapot.jpg"),
        ("teapot", 1, "image/jpeg", "teapot-1.jpg"),
        ("runs/v1.2", 0, "image/webp", "runs/v1.2.webp"),
        (None, 1, "image/png", "kiln-8.png"),
    ],
)
def test_output_path_rule(out: str | None, index: int, mime: str, expected: str) -> None:
    picture = GeneratedImage(index=index, seed=8, data=b"", mime_type=mime, width=8, height=8)
    assert output_path(out, picture) == Path(expected)


def test_out_extension_picks_the_format_and_conflicts_are_rejected(
    kiln: FakeKiln, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kiln.service.script = [image(0, 3, b"jpeg", "image/jpeg"), completed()]
    out = tmp_path / "teapot.jpg"
    assert run_cli("generate", "a teapot", "--server", kiln.address, "--out", str(out)) == 0
    assert kiln.service.requests[0].output_format == pb.OUTPUT_FORMAT_JPEG
    assert out.read_bytes() == b"jpeg"

    code = run_cli(
        "generate", "a teapot", "--server", kiln.address, "--out", str(out), "--format", "png"
    )
    assert code == 2
    assert "--format" in capsys.readouterr().err
    assert len(kiln.service.requests) == 1  # nothing was sent


def test_previews_are_written_per_step(kiln: FakeKiln, tmp_path: Path) -> None:
    kiln.service.script = [
        started(steps=3),
        progress(1, 3, preview=b"p1"),
        progress(2, 3),
        progress(3, 3, preview=b"p3"),
        image(0, 1, b"final"),
        completed(),
    ]
    previews = tmp_path / "previews"
    code = run_cli(
        "generate", "a teapot", "--server", kiln.address, "--out", str(tmp_path / "t.png"),
        "--previews", str(previews), "--preview-size", "128",
    )  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in previews.iterdir()) == ["step-0001.jpg", "step-0003.jpg"]
    assert (previews / "step-0003.jpg").read_bytes() == b"p3"
    preview = kiln.service.requests[0].preview
    assert (preview.every_n_steps, preview.max_size) == (1, 128)


@pytest.mark.parametrize("flag", [("--preview-every", "2"), ("--preview-method", "decoder")])
def test_preview_flags_without_a_directory_are_usage_errors(
    kiln: FakeKiln, capsys: pytest.CaptureFixture[str], flag: tuple[str, str]
) -> None:
    assert run_cli("generate", "x", "--server", kiln.address, *flag) == 2
    assert "--previews" in capsys.readouterr().err
    assert kiln.service.requests == []


def test_invalid_argument_names_fields_and_flags_and_exits_2(
    kiln: FakeKiln, capsys: pytest.CaptureFixture[str]
) -> None:
    kiln.service.script = [bad_request(("num_inference_steps", "must be at most 50"))]
    code = run_cli("generate", "a teapot", "--server", kiln.address, "--steps", "500")
    assert code == 2
    err = capsys.readouterr().err
    assert "num_inference_steps (--steps): must be at most 50" in err


@pytest.mark.parametrize(
    ("abort", "expected"),
    [
        (queue_full(3.0), "retry in 3 s"),
        (Abort(grpc.StatusCode.NOT_FOUND, "unknown model 'big'"), "kiln models"),
        (Abort(grpc.StatusCode.UNAVAILABLE, "server is draining"), "server is draining"),
    ],
)
def test_other_server_errors_exit_1_with_a_message(
    kiln: FakeKiln, capsys: pytest.CaptureFixture[str], abort: Abort, expected: str
) -> None:
    kiln.service.script = [abort]
    assert run_cli("generate", "a teapot", "--server", kiln.address) == 1
    err = capsys.readouterr().err
    assert expected in err
    assert "make serve" not in err  # the server was reached


def test_timeout_flag_sets_the_deadline(kiln: FakeKiln, capsys: pytest.CaptureFixture[str]) -> None:
    kiln.service.script = [queued(5), Hang()]
    assert run_cli("generate", "a teapot", "--server", kiln.address, "--timeout", "0.3") == 1
    assert "--timeout" in capsys.readouterr().err
    assert kiln.service.client_went_away.wait(5)


def test_unreachable_server_names_the_address_and_make_serve(
    capsys: pytest.CaptureFixture[str],
) -> None:
    address = closed_port_address()
    assert run_cli("generate", "a teapot", "--server", address, "--timeout", "5") == 1
    err = capsys.readouterr().err
    assert f"cannot reach a Kiln server at {address}" in err
    assert "make serve" in err
    assert run_cli("models", "--server", address, "--timeout", "5") == 1
    assert address in capsys.readouterr().err


def test_models_prints_models_and_defaults(
    kiln: FakeKiln, capsys: pytest.CaptureFixture[str]
) -> None:
    kiln.service.models = pb.ListModelsResponse(
        default_model="tiny-sdxl",
        models=[
            pb.ModelInfo(
                name="tiny-sdxl",
                family="sdxl",
                backend="onnxruntime",
                default_width=64,
                default_height=96,
                default_num_inference_steps=4,
                default_guidance_scale=5.0,
                default_scheduler="K_EULER",
                schedulers=["K_EULER", "DDIM"],
                device="cpu fp32",
                description="a small test model",
                backend_reason="ONNX graphs in engines/tiny-sdxl, on the CPU",
                min_size=32,
                max_size=512,
                size_multiple=16,
            ),
            pb.ModelInfo(name="other", family="sdxl", backend="torch"),
        ],
    )
    assert run_cli("models", "--server", kiln.address) == 0
    out = capsys.readouterr().out
    assert "tiny-sdxl (default)  [sdxl, onnxruntime, cpu fp32]" in out
    assert "about:    a small test model" in out
    assert "backend:  ONNX graphs in engines/tiny-sdxl, on the CPU" in out
    assert "size 32-512 px in steps of 16" in out
    assert "64x96, 4 steps, guidance 5, scheduler K_EULER" in out
    assert "schedulers: K_EULER, DDIM" in out
    assert "other  [sdxl, torch]" in out


def test_progress_reporter_shows_queue_position_then_steps() -> None:
    stream = io.StringIO()
    reporter = ProgressReporter(stream, enabled=True)
    reporter.on_event(queued(3))
    assert reporter.description == "queued (position 3)"
    assert "queued (position 3)" in stream.getvalue()
    reporter.on_event(started(steps=4))
    reporter.on_event(progress(1, 4))
    reporter.on_event(progress(2, 4))
    assert reporter.position == 2
    assert "2/4" in stream.getvalue()
    reporter.close()
    assert ProgressReporter(io.StringIO()).position == 0  # not a terminal: no bar


def test_help_documents_the_output_naming_rule(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run_cli("generate", "--help")
    assert "teapot-1.png" in capsys.readouterr().out
