"""`kiln generate` and `kiln models`: the command-line face of `KilnClient`.

`register(subparsers)` adds both subcommands to the `kiln` dispatcher. `generate` streams
one request with a progress bar on stderr, writes each final image (and optional previews)
as it arrives, and prints "wrote PATH (seed N)" per image on stdout. With `--image` (and
`--mask`) it sends a photo for image-to-image or inpainting. Exit codes: 0 on success, 2 for
a request the server (or this command) rejects as invalid, such as a missing `--image`
file, 1 otherwise.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from kiln_client.client import DEFAULT_TARGET, KilnClient
from kiln_client.connection import TOKEN_ENV, ConnectionSettingsError
from kiln_client.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    KilnError,
    ModelNotFound,
    PermissionDenied,
    ResourceExhausted,
    ServerUnreachable,
    Unauthenticated,
    Unavailable,
)
from kiln_client.image_formats import format_for_extension, format_named
from kiln_client.image_input import MAX_IMAGE_BYTES, ImageInputError
from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.requests import build_request, strength_value
from kiln_client.results import GeneratedImage, extension_for_mime_type

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INVALID",
    "EXIT_OK",
    "ProgressReporter",
    "describe_error",
    "output_path",
    "preview_path",
    "register",
    "run_generate",
    "run_models",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INVALID = 2

SERVER_ENV = "KILN_SERVER"

# GenerateRequest field → the flag that sets it, to point users at what to change.
_FLAG_BY_FIELD = {
    "prompt": "PROMPT",
    "model": "--model",
    "negative_prompt": "--negative-prompt",
    "width": "--width",
    "height": "--height",
    "num_outputs": "--num-outputs",
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance",
    "scheduler": "--scheduler",
    "seed": "--seed",
    "output_format": "--format",
    "output_quality": "--quality",
    "preview.every_n_steps": "--preview-every",
    "preview.max_size": "--preview-size",
    "preview.method": "--preview-method",
    "priority": "--priority",
    "image": "--image",
    "mask": "--mask",
    "strength": "--strength",
    "keep_unmasked": "--keep-unmasked",
    "mask_crop_padding": "--mask-crop-padding",
    "loras": "--lora",
}

# KilnClient connection keyword → the flag that sets it.
_FLAG_BY_ARGUMENT = {
    "target": "--server",
    "token": "--token",
    "tls_ca": "--tls-ca",
    "tls_cert": "--tls-cert",
    "tls_key": "--tls-key",
    "allow_plaintext_token": "--allow-plaintext-token",
}

_MAX_IMAGE_MIB = MAX_IMAGE_BYTES // 2**20

_EPILOG = f"""\
output naming:
  Image i of N is written to --out with "-i" before the extension for i > 0:
  --out teapot.png with --num-outputs 3 writes teapot.png, teapot-1.png, teapot-2.png.
  Without --out each image is written to kiln-<seed>.<ext> in the current directory
  (each output has its own seed: seed, seed+1, ...); an --out that is a directory (or ends
  in "/") gets those default names inside it. If --out has no image extension, the one
  of the chosen --format is appended; an --out ending in .png/.jpg/.jpeg/.webp picks the
  format when --format is not given. Previews go to DIR/step-0003.jpg (one per preview).

image conditioning:
  --image photo.png                    image-to-image: start from the photo
  --image photo.png --mask mask.png    inpainting: repaint where the mask is white
  The output has --image's size (rounded down to the model's size multiple) unless --width
  and --height are given. --image and --mask are PNG, JPEG or WebP files of at most
  {_MAX_IMAGE_MIB} MiB each (a server's default limit; `kiln models` shows each model's limits).
  The mask is resized to the photo: white = repaint, black = keep, grey = blend. With a
  mask the photo's own pixels are kept exactly where the mask is black, unless
  --no-keep-unmasked. --strength (0 < S <= 1, default 0.8) is how far the result may move
  from the photo: low keeps it, 1 starts from noise.

environment:
  KILN_SERVER      default for --server (otherwise 127.0.0.1:50051)
  KILN_API_TOKEN   bearer token sent to the server (see --token)
"""


class UsageError(Exception):
    """A command-line mistake detected before contacting the server (exit code 2)."""


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def _strength(text: str) -> float:
    try:
        return strength_value(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a number greater than 0 and at most 1, got {text!r}"
        ) from None


def lora_flag(text: str) -> tuple[str, float]:
    """`--lora NAME[:SCALE]` as (name, scale); the scale defaults to 1.0."""
    name, sep, scale_text = text.rpartition(":")
    if not sep:
        name, scale_text = text, ""
    if not name:
        raise argparse.ArgumentTypeError(f"expected NAME or NAME:SCALE, got {text!r}")
    if not sep:
        return name, 1.0
    try:
        scale = float(scale_text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected NAME:SCALE with a number after the colon, got {text!r}"
        ) from None
    if not math.isfinite(scale):
        raise argparse.ArgumentTypeError(f"the scale must be a finite number, got {text!r}")
    return name, scale


def _add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        metavar="H:P[,H:P]",
        default=None,
        help=f"Kiln server address (default: ${SERVER_ENV} or {DEFAULT_TARGET}); several "
        "comma-separated IP:PORT (or localhost:PORT) share the requests round-robin, as do "
        "the addresses of a DNS name given as dns:///NAME:PORT",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_float,
        default=None,
        help="give up after this many seconds (default: no limit)",
    )
    connection = parser.add_argument_group("connection security and retries")
    connection.add_argument(
        "--token",
        metavar="TOKEN",
        default=None,
        help=f"bearer token sent to the server (default: ${TOKEN_ENV}, which is preferred: "
        "a command line is visible to other users in ps)",
    )
    connection.add_argument(
        "--tls-ca",
        metavar="FILE",
        default=None,
        help="connect with TLS, trusting server certificates signed by this CA bundle (PEM)",
    )
    connection.add_argument(
        "--tls-cert",
        metavar="FILE",
        default=None,
        help="client certificate (PEM) for mutual TLS; needs --tls-key",
    )
    connection.add_argument(
        "--tls-key", metavar="FILE", default=None, help="private key (PEM) of --tls-cert"
    )
    connection.add_argument(
        "--tls-server-name",
        metavar="NAME",
        default=None,
        help="name the server's certificate carries, when it is not the --server host (for "
        "a list of addresses: the first one's)",
    )
    connection.add_argument(
        "--allow-plaintext-token",
        action="store_true",
        help="send the token without TLS to a server that is not on this host (only where "
        "that path is private, e.g. a TLS-terminating proxy on the same host)",
    )
    connection.add_argument(
        "--no-retry",
        dest="retry",
        action="store_false",
        help="fail at once when the server is unavailable (by default a call is tried up to "
        "4 times with backoff, and a generation whose server went away mid-way is sent "
        "again with the same seed)",
    )


def _open_client(args: argparse.Namespace, server: str) -> KilnClient:
    """The client the connection flags describe (ConnectionSettingsError when invalid)."""
    return KilnClient(
        server,
        timeout=args.timeout,
        token=args.token,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_server_name=args.tls_server_name,
        allow_plaintext_token=args.allow_plaintext_token,
        retry=args.retry,
    )


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `generate` and `models` subcommands, each with its `handler`."""
    gen = subparsers.add_parser(
        "generate",
        help="generate images from a prompt on a Kiln server",
        description="Generate images from PROMPT on a running Kiln server, with a "
        "progress bar on stderr. Prints 'wrote PATH (seed N)' for each image.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("prompt", metavar="PROMPT", help="what to draw")
    _add_server_arguments(gen)
    gen.add_argument("--out", metavar="FILE", help="output file (see 'output naming' below)")
    gen.add_argument("--seed", metavar="N", type=_non_negative_int, help="seed of the first image")
    gen.add_argument(
        "--steps",
        metavar="N",
        type=_non_negative_int,
        default=0,
        help="denoising steps (model default)",
    )
    gen.add_argument(
        "--width",
        metavar="W",
        type=_non_negative_int,
        default=0,
        help="pixels, multiple of 8 (default: the model's, or --image's width)",
    )
    gen.add_argument(
        "--height",
        metavar="H",
        type=_non_negative_int,
        default=0,
        help="pixels, multiple of 8 (default: the model's, or --image's height)",
    )
    gen.add_argument(
        "--num-outputs",
        metavar="N",
        type=_non_negative_int,
        default=0,
        help="images to make (default 1)",
    )
    gen.add_argument(
        "--model", metavar="NAME", default="", help="model name (server default; see kiln models)"
    )
    gen.add_argument(
        "--negative-prompt", metavar="TEXT", default="", help="what to steer away from"
    )
    gen.add_argument(
        "--guidance",
        metavar="SCALE",
        type=float,
        default=None,
        help="classifier-free guidance scale",
    )
    gen.add_argument("--scheduler", metavar="NAME", default="", help="scheduler name, e.g. K_EULER")
    gen.add_argument(
        "--format",
        choices=["png", "jpeg", "webp"],
        default=None,
        help="image encoding (default: from --out's extension, else png)",
    )
    gen.add_argument(
        "--quality", metavar="Q", type=_non_negative_int, default=0, help="JPEG/WebP quality 1-100"
    )
    gen.add_argument("--previews", metavar="DIR", help="write step previews into DIR")
    gen.add_argument(
        "--preview-every",
        metavar="N",
        type=_non_negative_int,
        default=None,
        help="a preview every N steps (default 1 with --previews)",
    )
    gen.add_argument(
        "--preview-size",
        metavar="PX",
        type=_non_negative_int,
        default=0,
        help="longest preview side in pixels (server default)",
    )
    gen.add_argument(
        "--preview-method",
        choices=["latent-rgb", "decoder"],
        default=None,
        help="how previews are drawn: the model's learned preview decoder (looks like the "
        "final image) or the free latent-to-RGB map (default: the model's best; see kiln "
        "models)",
    )
    gen.add_argument(
        "--priority", choices=["low", "normal", "high"], default="normal", help="queue priority"
    )
    gen.add_argument(
        "--lora",
        metavar="NAME[:SCALE]",
        dest="loras",
        action="append",
        type=lora_flag,
        default=[],
        help="apply a LoRA of the model (see kiln models) at SCALE (default 1; 0 = off; "
        "-4 to 4); repeat for several",
    )
    images = gen.add_argument_group("image conditioning (see 'image conditioning' below)")
    images.add_argument(
        "--image",
        metavar="FILE",
        default=None,
        help="input photo (PNG, JPEG or WebP): image-to-image, or inpainting with --mask; "
        "the output has its size unless --width/--height are given",
    )
    images.add_argument(
        "--mask",
        metavar="FILE",
        default=None,
        help="inpainting mask over --image (PNG, JPEG or WebP, resized to the photo): "
        "white = repaint, black = keep, grey = blend",
    )
    images.add_argument(
        "--strength",
        metavar="S",
        type=_strength,
        default=None,
        help="how far the result may move from --image, 0 < S <= 1; 1 starts from noise "
        "(default: the model's, 0.8)",
    )
    images.add_argument(
        "--keep-unmasked",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --mask: keep the photo's pixels exactly where the mask is black and blend "
        "where it is grey (default: on)",
    )
    images.add_argument(
        "--mask-crop-padding",
        metavar="N",
        type=_non_negative_int,
        default=None,
        help="with --mask: generate only in the mask's bounding box grown by N pixels, then "
        "paste it back; for small products in large photos (default: no crop)",
    )
    gen.set_defaults(handler=run_generate)

    models = subparsers.add_parser(
        "models",
        help="list the models a Kiln server serves",
        description="List the models a running Kiln server serves, with defaults and limits.",
    )
    _add_server_arguments(models)
    models.set_defaults(handler=run_models)


def resolve_server(flag: str | None) -> str:
    """The server address: --server, else $KILN_SERVER, else 127.0.0.1:50051."""
    return flag or os.environ.get(SERVER_ENV) or DEFAULT_TARGET


def choose_format(format_flag: str | None, out: str | None) -> str:
    """The output format: --format, else implied by --out's extension, else png.

    Raises:
        UsageError: --format contradicts --out's extension.
    """
    implied = None
    if out is not None and not _is_directory_target(out):
        found = format_for_extension(Path(out).suffix) if Path(out).suffix else None
        implied = found.name if found is not None else None
    if format_flag is None:
        return implied or "png"
    if implied is not None and implied != format_flag:
        raise UsageError(
            f"--out {out} has a {Path(out or '').suffix} extension but --format is "
            f"{format_flag}; change one of them"
        )
    return format_flag


def _is_directory_target(out: str) -> bool:
    return out.endswith(("/", os.sep)) or Path(out).is_dir()


def output_path(out: str | None, image: GeneratedImage, format_name: str = "png") -> Path:
    """Where image `image.index` goes (the rule in `kiln generate --help`).

    No --out (or a directory): `kiln-<seed><ext>`. Otherwise --out for index 0 and
    `<stem>-<index><ext>` for the others; `<ext>` is --out's image extension if it has one,
    else the extension of `format_name`.
    """
    named = format_named(format_name)
    fallback = named.extension if named is not None else ".png"
    extension = extension_for_mime_type(image.mime_type, fallback)
    if out is None or _is_directory_target(out):
        directory = Path(out) if out is not None else Path()
        return directory / f"kiln-{image.seed}{extension}"
    base = Path(out)
    if base.suffix and format_for_extension(base.suffix) is not None:
        extension = base.suffix
        base = base.with_suffix("")
    name = base.name if image.index == 0 else f"{base.name}-{image.index}"
    return base.with_name(name + extension)


def preview_path(directory: Path, progress: pb.ProgressEvent) -> Path:
    """`DIR/step-0003.jpg`: the step number, four digits, extension from the preview's MIME."""
    extension = extension_for_mime_type(progress.preview_mime_type, ".jpg")
    return directory / f"step-{progress.step:04d}{extension}"


class ProgressReporter:
    """A tqdm bar on `file` that follows a Generate stream.

    While queued it shows the queue position; once started it advances one tick per
    denoising step. With `enabled=None` it shows only when `file` is a terminal.
    """

    def __init__(self, file: TextIO, enabled: bool | None = None) -> None:
        if enabled is None:
            enabled = bool(getattr(file, "isatty", lambda: False)())
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=None,
                file=file,
                desc="connecting",
                unit="step",
                dynamic_ncols=True,
                leave=False,
            )

    def on_event(self, event: pb.GenerateResponse) -> None:
        """Update the bar for one event."""
        bar = self._bar
        if bar is None:
            return
        kind = event.WhichOneof("event")
        if kind == "queued":
            bar.set_description_str(f"queued (position {event.queued.position})")
        elif kind == "started":
            bar.reset(total=event.started.num_inference_steps or None)  # restart the clock
            bar.set_description_str("generating")
        elif kind == "progress":
            progress = event.progress
            if progress.total_steps and bar.total != progress.total_steps:
                bar.total = progress.total_steps
            bar.set_description_str("generating")
            bar.update(max(0, progress.step - bar.n))
            bar.refresh()  # steps are seconds apart: show each one, whatever tqdm's throttle
        elif kind == "image":
            bar.set_description_str(f"received image {event.image.index}")

    @property
    def position(self) -> int:
        """Steps shown as done (0 when disabled)."""
        return int(self._bar.n) if self._bar is not None else 0

    @property
    def description(self) -> str:
        """The bar's current label ("" when disabled)."""
        return str(self._bar.desc) if self._bar is not None else ""

    def close(self) -> None:
        """Remove the bar from the terminal. Safe to call twice."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@dataclass
class _GenerateRun:
    """Side effects of one `kiln generate` as events arrive: bar, previews, image files."""

    out: str | None
    format_name: str
    previews: Path | None
    progress: ProgressReporter
    written: list[tuple[Path, int]] = field(default_factory=list)

    def on_event(self, event: pb.GenerateResponse) -> None:
        self.progress.on_event(event)
        kind = event.WhichOneof("event")
        if kind == "progress" and self.previews is not None and event.progress.preview:
            path = preview_path(self.previews, event.progress)
            path.write_bytes(event.progress.preview)
        elif kind == "image":
            image = GeneratedImage.from_event(event.image)
            path = image.save(output_path(self.out, image, self.format_name))
            self.written.append((path, image.seed))


def _flag_for(field_path: str) -> str | None:
    if field_path == "loras" or field_path.startswith("loras["):
        return "--lora"
    return _FLAG_BY_FIELD.get(field_path) or _FLAG_BY_FIELD.get(field_path.rsplit(".", 1)[-1])


def describe_error(
    err: KilnError, server: str, timeout: float | None = None, *, token_sent: bool = True
) -> str:
    """A message for a failed call that names the field(s), flag(s) or address involved.

    `token_sent` says whether the call carried a bearer token (for UNAUTHENTICATED).
    """
    if isinstance(err, ServerUnreachable):
        if any(word in err.message.lower() for word in ("handshake", "verification")):
            return (
                f"the TLS handshake with {server} failed ({err.message}).\n"
                "Check that --tls-ca is the CA bundle that signed the server's certificate, "
                "that the certificate names the address in --server, and for mutual TLS "
                "that --tls-cert/--tls-key are a client certificate the server trusts."
            )
        return (
            f"cannot reach a Kiln server at {server} ({err.message}).\n"
            "Start one with `make serve` (or `kiln serve`), or point --server / "
            f"${SERVER_ENV} at a running server."
        )
    if isinstance(err, Unauthenticated):
        if not token_sent:
            return (
                f"the server at {server} requires an API token and none was sent: set "
                f"${TOKEN_ENV} (or --token) to one of the tokens it accepts ({err.message})"
            )
        return (
            f"the server at {server} does not accept the API token ({err.message}): check "
            f"${TOKEN_ENV} / --token against the tokens the server accepts"
        )
    if isinstance(err, PermissionDenied):
        return (
            f"the API token is not allowed to do this on the server at {server} "
            f"({err.message}): use a token that has the needed scope"
        )
    if isinstance(err, InvalidArgument):
        if not err.field_violations:
            return f"the server rejected the request: {err.message}"
        lines = ["the server rejected the request:"]
        for field_path, description in err.field_violations:
            flag = _flag_for(field_path)
            where = f"{field_path} ({flag})" if flag else field_path
            lines.append(f"  {where}: {description}")
        return "\n".join(lines)
    if isinstance(err, ModelNotFound) and err.field_violations:
        lines = ["the server has no such LoRA:"]
        for field_path, description in err.field_violations:
            flag = _flag_for(field_path)
            where = f"{field_path} ({flag})" if flag else field_path
            lines.append(f"  {where}: {description}")
        lines.append(f"`kiln models --server {server}` lists each model's LoRAs")
        return "\n".join(lines)
    if isinstance(err, ModelNotFound):
        return f"{err.message}; `kiln models --server {server}` lists the served models"
    if isinstance(err, ResourceExhausted):
        wait = f"; retry in {err.retry_after:g} s" if err.retry_after is not None else ""
        return f"the server at {server} is busy: {err.message}{wait}"
    if isinstance(err, DeadlineExceeded):
        limit = f" within {timeout:g} s (--timeout)" if timeout is not None else ""
        return f"no result{limit}: {err.message}"
    if isinstance(err, Unavailable):
        return f"the server at {server} is unavailable: {err.message}"
    if isinstance(err, Cancelled):
        return f"the request was cancelled: {err.message}"
    return f"the server at {server} failed the request: {err}"


def _check_image_flags(args: argparse.Namespace) -> None:
    """Refuse image-conditioning flags given without the flag they apply to."""
    if args.mask is not None and args.image is None:
        raise UsageError("--mask needs --image: the mask marks what to repaint in the photo")
    if args.strength is not None and args.image is None:
        raise UsageError("--strength needs --image: it says how far to move from the photo")
    if args.keep_unmasked is not None and args.mask is None:
        flag = "--keep-unmasked" if args.keep_unmasked else "--no-keep-unmasked"
        raise UsageError(f"{flag} needs --mask: it decides what happens to the mask's black pixels")
    if args.mask_crop_padding is not None and args.mask is None:
        raise UsageError("--mask-crop-padding needs --mask: it crops around the masked region")


def _describe_mode(mode: str | None, strength: float | None) -> str:
    """ "inpaint at strength 0.8: " for an image-conditioned run, "" otherwise."""
    if mode is None or mode == "text_to_image":
        return ""
    at = f" at strength {strength:g}" if strength is not None else ""
    return f"{mode.replace('_', ' ')}{at}: "


def _fail(message: str, code: int) -> int:
    print(f"kiln: error: {message}", file=sys.stderr)
    return code


def run_generate(args: argparse.Namespace) -> int:
    """Handler of `kiln generate`: run one request and write its images; return the exit code."""
    server = resolve_server(args.server)
    try:
        format_name = choose_format(args.format, args.out)
        if args.preview_every is not None and args.preview_every > 0 and not args.previews:
            raise UsageError("--preview-every needs --previews DIR to write the previews into")
        if args.preview_method is not None and not args.previews:
            raise UsageError("--preview-method needs --previews DIR to write the previews into")
        _check_image_flags(args)
        preview_every = args.preview_every
        if preview_every is None:
            preview_every = 1 if args.previews else 0
        request = build_request(
            args.prompt,
            model=args.model,
            negative_prompt=args.negative_prompt,
            width=args.width,
            height=args.height,
            num_outputs=args.num_outputs,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            scheduler=args.scheduler,
            seed=args.seed,
            output_format=format_name,
            output_quality=args.quality,
            preview_every=preview_every,
            preview_max_size=args.preview_size,
            preview_method=args.preview_method or "auto",
            priority=args.priority,
            image=args.image,
            mask=args.mask,
            strength=args.strength,
            keep_unmasked=args.keep_unmasked,
            mask_crop_padding=args.mask_crop_padding,
            loras=args.loras,
        )
    except ImageInputError as exc:
        return _fail(exc.message_for(_FLAG_BY_FIELD[exc.argument]), EXIT_INVALID)
    except (UsageError, ValueError) as exc:
        return _fail(str(exc), EXIT_INVALID)

    previews = Path(args.previews) if args.previews else None
    if previews is not None:
        try:
            previews.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return _fail(f"cannot create --previews directory {previews}: {exc}", EXIT_FAILURE)

    try:
        client = _open_client(args, server)
    except ConnectionSettingsError as exc:
        return _fail(exc.message_for(_FLAG_BY_ARGUMENT), EXIT_INVALID)
    progress = ProgressReporter(sys.stderr)
    run = _GenerateRun(args.out, format_name, previews, progress)
    code = EXIT_OK
    summary = ""
    try:
        with client:
            result = client.generate(request=request, on_event=run.on_event)
        timings = result.timings
        summary = (
            f"{_describe_mode(result.mode, result.strength)}"
            f"done in {timings.total_seconds:.2f} s (queued {timings.queue_seconds:.2f} s, "
            f"inference {timings.inference_seconds:.2f} s); request {result.request_id}"
        )
        if args.image is not None and result.mode in (None, "text_to_image"):
            summary = (
                f"kiln: warning: the server at {server} did not run an image-conditioned "
                "generation: it may predate --image support and have drawn from the prompt "
                f"alone\n{summary}"
            )
    except KilnError as err:
        code = EXIT_INVALID if isinstance(err, InvalidArgument) else EXIT_FAILURE
        message = describe_error(
            err, server, args.timeout, token_sent=client.connection.token is not None
        )
        summary = f"kiln: error: {message}"
    except OSError as exc:
        code = EXIT_FAILURE
        name = exc.filename if exc.filename is not None else ""
        summary = f"kiln: error: cannot write {name}: {exc.strerror or exc}"
    finally:
        progress.close()
        for path, seed in run.written:
            print(f"wrote {path} (seed {seed})")
    print(summary, file=sys.stderr)
    return code


def format_models(response: pb.ListModelsResponse) -> str:
    """Human-readable listing of the served models, their defaults and limits."""
    if not response.models:
        return "the server serves no models"
    lines: list[str] = []
    for model in response.models:
        marker = " (default)" if model.name == response.default_model else ""
        where = f", {model.device}" if model.device else ""
        lines.append(f"{model.name}{marker}  [{model.family}, {model.backend}{where}]")
        if model.description:
            lines.append(f"  about:    {model.description}")
        if model.backend_reason:
            lines.append(f"  backend:  {model.backend_reason}")
        lines.append(
            f"  defaults: {model.default_width}x{model.default_height}, "
            f"{model.default_num_inference_steps} steps, "
            f"guidance {model.default_guidance_scale:g}, scheduler {model.default_scheduler}"
        )
        lines.append(
            f"  limits:   size {model.min_size}-{model.max_size} px"
            f"{f' in steps of {model.size_multiple}' if model.size_multiple else ''}, "
            f"steps <= {model.max_num_inference_steps}, outputs <= {model.max_num_outputs}, "
            f"guidance <= {model.max_guidance_scale:g}, prompt <= {model.max_prompt_tokens} tokens"
        )
        if model.max_image_bytes:
            lines.append(
                f"  images:   --image/--mask up to {model.max_image_bytes / 2**20:g} MiB and "
                f"{model.max_image_pixels:,} pixels each, strength {model.default_strength:g} "
                "by default"
                + ("; an inpainting model: needs --image and --mask" if model.inpainting else "")
            )
        if model.schedulers:
            lines.append(f"  schedulers: {', '.join(model.schedulers)}")
        if model.preview_methods:
            methods = [
                f"{m} (default)" if m == model.default_preview_method else m
                for m in model.preview_methods
            ]
            lines.append(f"  previews: {', '.join(methods)}")
        if model.loras:
            lines.append(
                f"  loras:    --lora NAME[:SCALE], up to {model.max_loras_per_request} per request"
            )
            for lora in model.loras:
                lines.append(f"    {lora.name}  (rank {lora.rank}, {lora.format})")
    return "\n".join(lines)


def run_models(args: argparse.Namespace) -> int:
    """Handler of `kiln models`: print the served models; return the exit code."""
    server = resolve_server(args.server)
    try:
        client = _open_client(args, server)
    except ConnectionSettingsError as exc:
        return _fail(exc.message_for(_FLAG_BY_ARGUMENT), EXIT_INVALID)
    try:
        with client:
            response = client.list_models()
    except KilnError as err:
        code = EXIT_INVALID if isinstance(err, InvalidArgument) else EXIT_FAILURE
        token_sent = client.connection.token is not None
        return _fail(describe_error(err, server, args.timeout, token_sent=token_sent), code)
    print(format_models(response))
    return EXIT_OK
