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
    png,
    progress,
    queue_full,
    queued,
    running_fake_server,
    started,
)

from kiln_client import generate_cli
from kiln_client.generate_cli import ProgressReporter, output_path
from kiln_client.image_input import MAX_IMAGE_BYTES
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
    # No --seed: the client picks one, so that a resubmitted request draws the same images.
    assert kiln.service.requests[0].HasField("seed")


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


# Image conditioning: --image, --mask, --strength, --keep-unmasked, --mask-crop-padding

PHOTO = png(12, 8)
MASK = png(12, 8, mode="L")


@pytest.fixture
def photo_and_mask(tmp_path: Path) -> tuple[Path, Path]:
    photo = tmp_path / "photo.png"
    mask = tmp_path / "mask.png"
    photo.write_bytes(PHOTO)
    mask.write_bytes(MASK)
    return photo, mask


def test_image_flags_send_the_files_and_the_options(
    kiln: FakeKiln,
    tmp_path: Path,
    photo_and_mask: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    photo, mask = photo_and_mask
    kiln.service.script = [
        started(mode="inpaint", strength=0.6),
        image(0, 1, b"out"),
        completed(),
    ]
    code = run_cli(
        "generate", "a red circle on a yellow background", "--server", kiln.address,
        "--out", str(tmp_path / "out.png"), "--image", str(photo), "--mask", str(mask),
        "--strength", "0.6", "--no-keep-unmasked", "--mask-crop-padding", "16",
    )  # fmt: skip
    assert code == 0
    (sent,) = kiln.service.requests
    assert (sent.image, sent.mask) == (PHOTO, MASK)
    assert sent.HasField("strength") and sent.strength == pytest.approx(0.6)
    assert sent.HasField("keep_unmasked") and sent.keep_unmasked is False
    assert sent.HasField("mask_crop_padding") and sent.mask_crop_padding == 16
    assert (sent.width, sent.height) == (0, 0)  # the output size comes from the photo
    err = capsys.readouterr().err
    assert "inpaint at strength 0.6: done in" in err
    assert "warning" not in err


def test_image_alone_leaves_the_options_to_the_server(
    kiln: FakeKiln, tmp_path: Path, photo_and_mask: tuple[Path, Path]
) -> None:
    photo, _ = photo_and_mask
    kiln.service.script = [started(mode="image_to_image", strength=0.8), completed(0)]
    code = run_cli("generate", "x", "--server", kiln.address, "--image", str(photo))
    assert code == 0
    (sent,) = kiln.service.requests
    assert sent.image == PHOTO and sent.mask == b""
    for name in ("strength", "keep_unmasked", "mask_crop_padding"):
        assert not sent.HasField(name)

    kiln.service.script = [started(), completed(0)]
    assert run_cli("generate", "x", "--server", kiln.address) == 0
    assert kiln.service.requests[1].image == b""


def test_a_server_that_ignores_the_image_gets_a_warning(
    kiln: FakeKiln, photo_and_mask: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    photo, _ = photo_and_mask
    kiln.service.script = [started(), completed(0)]  # no mode: predates image conditioning
    assert run_cli("generate", "x", "--server", kiln.address, "--image", str(photo)) == 0
    err = capsys.readouterr().err
    assert f"warning: the server at {kiln.address} did not run an image-conditioned" in err


@pytest.mark.parametrize("flag", ["--image", "--mask"])
def test_a_missing_file_names_the_flag_and_path_and_exits_2(
    flag: str,
    kiln: FakeKiln,
    tmp_path: Path,
    photo_and_mask: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    photo, mask = photo_and_mask
    missing = tmp_path / "missing.png"
    files = {"--image": str(photo), "--mask": str(mask), flag: str(missing)}
    argv = [arg for pair in files.items() for arg in pair]
    assert run_cli("generate", "x", "--server", kiln.address, *argv) == 2
    assert capsys.readouterr().err == f"kiln: error: {flag} {missing}: no such file\n"
    assert kiln.service.requests == []


def test_a_directory_or_an_oversized_file_is_refused(
    kiln: FakeKiln, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("generate", "x", "--server", kiln.address, "--image", str(tmp_path)) == 2
    assert f"--image {tmp_path}: a directory, not an image file" in capsys.readouterr().err

    big = tmp_path / "huge.jpg"
    with big.open("wb") as handle:  # sparse: nothing is written
        handle.truncate(MAX_IMAGE_BYTES + 1)
    assert run_cli("generate", "x", "--server", kiln.address, "--image", str(big)) == 2
    err = capsys.readouterr().err
    assert f"--image {big}: too large: 20,971,521 bytes, over the limit of 20 MiB" in err
    assert kiln.service.requests == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mask", "m.png"], "--mask needs --image"),
        (["--strength", "0.5"], "--strength needs --image"),
        (["--image", "p.png", "--keep-unmasked"], "--keep-unmasked needs --mask"),
        (["--image", "p.png", "--no-keep-unmasked"], "--no-keep-unmasked needs --mask"),
        (["--image", "p.png", "--mask-crop-padding", "8"], "--mask-crop-padding needs --mask"),
    ],
)
def test_image_options_without_what_they_need_are_usage_errors(
    argv: list[str], message: str, kiln: FakeKiln, capsys: pytest.CaptureFixture[str]
) -> None:
    # Checked before any file is opened: these files do not exist.
    assert run_cli("generate", "x", "--server", kiln.address, *argv) == 2
    assert message in capsys.readouterr().err
    assert kiln.service.requests == []


@pytest.mark.parametrize("value", ["0", "1.5", "nan", "-0.2", "inf", "half"])
def test_strength_outside_zero_to_one_is_a_usage_error(
    value: str,
    kiln: FakeKiln,
    photo_and_mask: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    photo, _ = photo_and_mask
    with pytest.raises(SystemExit) as caught:
        run_cli(
            "generate", "x", "--server", kiln.address, "--image", str(photo), "--strength", value
        )
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert (
        f"argument --strength: must be a number greater than 0 and at most 1, got '{value}'" in err
    )
    assert kiln.service.requests == []


def test_server_rejections_of_image_fields_name_the_flags(
    kiln: FakeKiln, photo_and_mask: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    photo, mask = photo_and_mask
    kiln.service.script = [
        bad_request(("image", "is 9000x9000, over the 4 MP limit"), ("mask", "is not an image"))
    ]
    code = run_cli(
        "generate", "x", "--server", kiln.address, "--image", str(photo), "--mask", str(mask)
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "image (--image): is 9000x9000, over the 4 MP limit" in err
    assert "mask (--mask): is not an image" in err


def test_help_documents_the_image_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run_cli("generate", "--help")
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for flag in ("--image FILE", "--mask FILE", "--strength S", "--no-keep-unmasked"):
        assert flag in text
    assert "--mask-crop-padding N" in text
    assert "The output has --image's size (rounded down to the model's size multiple)" in text
    assert "white = repaint, black = keep" in text
    assert "0 < S <= 1" in text
    assert "20 MiB" in text


def test_models_shows_the_image_limits(kiln: FakeKiln, capsys: pytest.CaptureFixture[str]) -> None:
    kiln.service.models = pb.ListModelsResponse(
        default_model="inpaint",
        models=[
            pb.ModelInfo(
                name="inpaint",
                family="sdxl",
                backend="torch",
                default_strength=0.8,
                max_image_bytes=20 * 1024 * 1024,
                max_image_pixels=16_777_216,
                inpainting=True,
            ),
            pb.ModelInfo(name="old", family="sdxl", backend="torch"),
        ],
    )
    assert run_cli("models", "--server", kiln.address) == 0
    lines = capsys.readouterr().out.splitlines()
    images = [line for line in lines if line.startswith("  images:")]
    assert images == [
        "  images:   --image/--mask up to 20 MiB and 16,777,216 pixels each, strength 0.8 by "
        "default; an inpainting model: needs --image and --mask"
    ]


# Connection: --token, TLS, --allow-plaintext-token, --no-retry, several servers


def test_token_comes_from_the_flag_or_kiln_api_token(
    kiln: FakeKiln, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    kiln.service.script = [image(0, 7, b"png"), completed()]
    monkeypatch.setenv("KILN_API_TOKEN", "from-env")
    assert run_cli("models", "--server", kiln.address) == 0
    assert run_cli("models", "--server", kiln.address, "--token", "from-flag") == 0
    monkeypatch.delenv("KILN_API_TOKEN")
    out = str(tmp_path / "x.png")
    assert run_cli("generate", "x", "--server", kiln.address, "--token", "t", "--out", out) == 0
    assert [m.get("authorization") for m in kiln.service.metadata] == [
        "Bearer from-env",
        "Bearer from-flag",
        "Bearer t",
    ]


def test_help_prefers_the_environment_for_the_token(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run_cli("generate", "--help")
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--token", "--tls-ca", "--tls-cert", "--tls-key", "--allow-plaintext-token"):
        assert flag in text
    assert "KILN_API_TOKEN, which is preferred: a command line is visible to other users" in text
    assert "--no-retry" in text


@pytest.mark.parametrize("command", [("models",), ("generate", "a teapot")])
def test_a_plaintext_token_to_another_host_is_refused_naming_the_flags(
    capsys: pytest.CaptureFixture[str], command: tuple[str, ...]
) -> None:
    code = run_cli(*command, "--server", "10.1.2.3:50051", "--token", "s3cret")
    assert code == 2
    err = capsys.readouterr().err
    assert "plain text" in err and "--tls-ca" in err and "--allow-plaintext-token" in err
    assert "s3cret" not in err


def test_tls_flags_are_checked_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert = tmp_path / "client.pem"
    cert.write_text("not used")
    assert run_cli("models", "--tls-cert", str(cert)) == 2
    assert "--tls-cert needs --tls-key" in capsys.readouterr().err
    assert run_cli("models", "--tls-ca", str(tmp_path / "absent.pem")) == 2
    assert f"--tls-ca {tmp_path / 'absent.pem'}: cannot read it" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("abort", "token", "expected"),
    [
        (
            Abort(grpc.StatusCode.UNAUTHENTICATED, "missing bearer token"),
            None,
            "requires an API token and none was sent: set $KILN_API_TOKEN (or --token)",
        ),
        (
            Abort(grpc.StatusCode.UNAUTHENTICATED, "unknown token"),
            "wrong",
            "does not accept the API token (unknown token)",
        ),
        (
            Abort(grpc.StatusCode.PERMISSION_DENIED, "the token lacks the generate scope"),
            "read-only",
            "not allowed to do this",
        ),
        (
            queue_full(1.5),
            "busy-token",
            "is busy: queue is full (64 waiting); retry in 1.5 s",
        ),
    ],
)
def test_auth_and_limit_errors_say_what_to_do(
    kiln: FakeKiln,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    abort: Abort,
    token: str | None,
    expected: str,
) -> None:
    monkeypatch.delenv("KILN_API_TOKEN", raising=False)
    kiln.service.script = [abort]
    kiln.service.list_models_abort = abort
    flags = ["--token", token] if token else []
    assert run_cli("generate", "a teapot", "--server", kiln.address, *flags) == 1
    assert expected in capsys.readouterr().err
    assert run_cli("models", "--server", kiln.address, *flags) == 1
    assert expected in capsys.readouterr().err


def test_no_retry_fails_when_the_stream_breaks(
    kiln: FakeKiln, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = [queued(0), Abort(grpc.StatusCode.UNAVAILABLE, "Stream removed")]
    kiln.service.scripts = [list(broken)]
    kiln.service.script = [image(0, 7, b"png"), completed()]
    out = str(tmp_path / "x.png")
    assert run_cli("generate", "x", "--server", kiln.address, "--no-retry", "--out", out) == 1
    assert "unavailable: Stream removed" in capsys.readouterr().err
    # With retries (the default) the same break is resubmitted and the image written once.
    kiln.service.scripts = [list(broken)]
    assert run_cli("generate", "x", "--server", kiln.address, "--out", out) == 0
    assert capsys.readouterr().out == f"wrote {out} (seed 7)\n"
    assert len(kiln.service.requests) == 3


def test_server_takes_a_list_of_addresses(capsys: pytest.CaptureFixture[str]) -> None:
    with running_fake_server() as first, running_fake_server() as second:
        for fake in (first, second):
            fake.service.models = pb.ListModelsResponse(
                default_model="tiny", models=[pb.ModelInfo(name="tiny")]
            )
        servers = f"{first.address},{second.address}"
        for _ in range(40):
            assert run_cli("models", "--server", servers) == 0
            if first.service.metadata and second.service.metadata:
                break
        assert first.service.metadata and second.service.metadata
    assert "tiny (default)" in capsys.readouterr().out
