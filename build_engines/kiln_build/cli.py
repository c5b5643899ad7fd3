"""`kiln build-engines`: export a model's components to ONNX and (on a GPU host) TensorRT.

    kiln build-engines [--model NAME | --model-path DIR] [--format onnx|tensorrt] [--out DIR]
                       [--batch-sizes 1,2,4] [--min-size PX] [--max-size PX] [--vae-batch N]
                       [--refittable] [--skip-numerics-check]
                       [--lora-slots N] [--max-lora-rank R] [--max-loras-per-request K] ...

Heavy imports (torch, onnx, TensorRT) happen inside the handler so `kiln --help` stays fast.
Every failure prints one `error:` line naming what is wrong and what to do, and exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln_build.profiles import ModelLimits

DEFAULT_OUT = Path("engines")
PROFILE_NOTE = (
    "TensorRT engines only run the batch sizes and image sizes of their optimization "
    "profiles, and a server using them refuses every request beyond these with "
    "INVALID_ARGUMENT. The defaults cover every request the model's defaults allow "
    "(num_outputs up to its max_num_outputs with guidance, sides from its min_size up to "
    "its default size); --max-size up to the model's max_size admits larger images at the "
    "cost of GPU memory, and narrower ranges build faster and need less memory but give "
    "up the requests outside them."
)


@dataclass(frozen=True)
class ResolvedModel:
    """The model to build: its name (engines go to <out>/<name>), folder, defaults, limits."""

    name: str
    path: Path
    default_size: tuple[int, int] | None = None  # (height, width) from the registry
    # Request limits from the registry entry; None: read from the folder at build time.
    limits: ModelLimits | None = None
    # The config's `preview_decoder` folder; None: the model folder's own, if any.
    preview_decoder: Path | None = None
    # A single-file checkpoint whose weights replace the folder's (`path` is its config
    # folder); None: the folder's own weights.
    checkpoint: Path | None = None


def resolve_model(name: str | None, path: Path | None, config: Path | None) -> ResolvedModel:
    """Map `--model NAME`, `--model-path DIR` and `--config FILE` to the model to build.

    The one place that knows how a NAME becomes a folder: the server's model registry
    (the config's [[models]], else the built-in default), plus every built-in model by name.
    With `--model-path` the folder is built as NAME (default: the folder's name). Raises
    ValueError (RegistryError/SettingsError) naming an unknown model or a bad config.
    """
    from kiln_build.profiles import ModelLimits
    from kiln_server.models.registry import (
        BUILTIN_MODELS,
        ModelRegistry,
        RegistryError,
        builtin_model_path,
        default_cache_dir,
    )
    from kiln_server.settings import read_config_file

    if path is not None:
        folder = path.expanduser().resolve()
        return ResolvedModel(name or folder.name, folder)
    cache_dir = (
        Path(os.environ["KILN_CACHE_DIR"]).expanduser()
        if os.environ.get("KILN_CACHE_DIR")
        else default_cache_dir()
    )
    registry = ModelRegistry.from_config(read_config_file(config) if config else {}, cache_dir)
    spec = registry.get(name or "")
    if spec is not None:
        return ResolvedModel(
            spec.name,
            spec.path,
            (spec.default_height, spec.default_width),
            ModelLimits.of(spec),
            spec.preview_decoder,
            spec.checkpoint,
        )
    if name in BUILTIN_MODELS:
        return ResolvedModel(name, builtin_model_path(name, cache_dir))
    known = sorted({*registry.models, *BUILTIN_MODELS})
    raise RegistryError(
        f"unknown model {name!r}: known models are {', '.join(known)}; pass --config FILE "
        "for models defined there, or --model-path DIR for a diffusers SDXL or FLUX folder"
    )


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers, e.g. 1,2,4"
        ) from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("batch sizes must be positive integers, e.g. 1,2,4")
    return sizes


def _positive(flag: str) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not an integer") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} {value} must be at least 1")
        return value

    return parse


def lora_record(args: argparse.Namespace) -> Any:
    """The LoRA inputs asked for by the flags (a LoraRecord), or None when none was given;
    flags not given take the server's defaults."""
    from kiln_server.engines.manifest import LoraRecord
    from kiln_server.settings import ServerSettings

    given = (args.lora_slots, args.max_lora_rank, args.max_loras_per_request)
    if all(value is None for value in given):
        return None
    defaults = ServerSettings()
    slots, rank, per_request = given
    return LoraRecord(
        slots=slots if slots is not None else defaults.lora_slots,
        max_rank=rank if rank is not None else defaults.max_lora_rank,
        max_loras=per_request if per_request is not None else defaults.max_loras_per_request,
    )


def register(subparsers: Any) -> None:
    """Add the `build-engines` subcommand to the `kiln` parser."""
    parser = subparsers.add_parser(
        "build-engines",
        help="export a model to ONNX (and TensorRT engines on a GPU host)",
        description=(
            "Export every component of an SDXL or FLUX model to ONNX, clean and validate the "
            "graphs against torch, and with --format tensorrt build TensorRT engines for this "
            "GPU (SDXL: fp16, VAE fp32; FLUX: bf16) and check each against onnxruntime. "
            "Writes the engines and a manifest.json into OUT/<model name>/."
        ),
        epilog=PROFILE_NOTE,
    )
    parser.add_argument(
        "--model",
        metavar="NAME",
        help="model to build, by name (default: the server's default model)",
    )
    parser.add_argument(
        "--model-path",
        metavar="DIR",
        type=Path,
        help="build this diffusers SDXL or FLUX folder (as --model NAME; default: its name)",
    )
    parser.add_argument(
        "--config", metavar="FILE", type=Path, help="the server's TOML config naming the models"
    )
    parser.add_argument(
        "--format",
        choices=("onnx", "tensorrt"),
        default="onnx",
        help="onnx: graphs for the onnxruntime backend; tensorrt: also TensorRT engines",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        default=DEFAULT_OUT,
        help="engines root: writes DIR/<model name>/, what `kiln serve --engines DIR` reads",
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17; default 17)")
    parser.add_argument(
        "--batch-sizes",
        metavar="N,N",
        type=_batch_sizes,
        help=(
            "TensorRT: images per UNet (FLUX: transformer) call to support; the largest sets "
            "its profile (2 rows per image under guidance, 1 with FLUX's distilled guidance; "
            "default: the model's max_num_outputs, e.g. "
            "8 images = 16 rows); requests for more images are refused"
        ),
    )
    parser.add_argument(
        "--min-size",
        metavar="PX",
        type=int,
        help=(
            "TensorRT: smallest image side to support (default: the model's min_size, "
            "rounded up to the multiple its UNet graph needs); smaller requests are refused"
        ),
    )
    parser.add_argument(
        "--max-size",
        metavar="PX",
        type=int,
        help=(
            "TensorRT: largest image side to support (default: the model's default size; "
            "at most its max_size); larger requests are refused"
        ),
    )
    parser.add_argument(
        "--vae-batch",
        metavar="N",
        type=int,
        help=(
            "TensorRT: images per VAE decoder and encoder call (default 1); the server "
            "decodes larger requests in chunks of N, and a larger N needs more GPU memory"
        ),
    )
    parser.add_argument(
        "--refittable",
        action="store_true",
        help=(
            "TensorRT: build engines whose weights can be replaced later without a rebuild "
            "(for LoRA or other weight refits); refittable engines can be slower, so only "
            "ask for them when engines will be refitted (default: off)"
        ),
    )
    lora = parser.add_argument_group(
        "per-request LoRAs",
        "Off by default. Given any of these flags, the UNet graph takes per-row LoRA inputs "
        "(each row's adapter slots and scales, and every layer's adapter stacks), so "
        "onnxruntime and TensorRT serve any LoRA without a rebuild or a refit. The server "
        "must run with the same lora_slots and max_lora_rank settings (and at most this "
        "max_loras_per_request). The stacks take (slots + 1) x rank x (in + out) floats per "
        "UNet layer, and every UNet call computes each row's LoRA delta, so keep them small.",
    )
    lora.add_argument(
        "--lora-slots",
        metavar="N",
        type=_positive("--lora-slots"),
        help="LoRAs resident at once (the server's lora_slots; default with LoRA support: 8)",
    )
    lora.add_argument(
        "--max-lora-rank",
        metavar="R",
        type=_positive("--max-lora-rank"),
        help="highest LoRA rank served (the server's max_lora_rank; default: 128)",
    )
    lora.add_argument(
        "--max-loras-per-request",
        metavar="K",
        type=_positive("--max-loras-per-request"),
        help="LoRAs one request may apply (the server's max_loras_per_request; default: 4)",
    )
    parser.add_argument(
        "--skip-numerics-check",
        action="store_true",
        help=(
            "TensorRT: do not compare each built engine with onnxruntime (CPU, fp32) on the "
            "same graph and inputs; the check, recorded in the manifest, fails the build "
            "when an engine's outputs are not finite or differ beyond the tolerance of "
            "its precision (fp16 or fp32)"
        ),
    )
    parser.add_argument(
        "--timing-cache",
        metavar="FILE",
        type=Path,
        help="TensorRT timing cache (default: one per machine in --out)",
    )
    parser.add_argument(
        "--workspace-gib", type=float, default=8.0, help="TensorRT builder workspace (GiB)"
    )
    parser.add_argument(
        "--no-validate", action="store_true", help="skip comparing the graphs against torch"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{size} B"
        value /= 1024
    return f"{size} B"


def run(args: argparse.Namespace) -> int:
    """Handle `kiln build-engines`; returns the exit code (0 ok, 1 on any failure)."""
    from kiln_server.engines.base import EngineError

    try:
        return _run(args)
    except (EngineError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from kiln_server.engines.machine import require_tensorrt

    if args.format == "tensorrt":
        require_tensorrt("build TensorRT engines")  # before any model is read or built

    from kiln_build.build import BuildOptions, run_build
    from kiln_build.profiles import ProfileFlags

    model = resolve_model(args.model, args.model_path, args.config)
    options = BuildOptions(
        model_path=model.path,
        out_dir=args.out / model.name,
        fmt=args.format,
        model_name=model.name,
        config=str(args.config.resolve()) if args.config else None,
        default_size=model.default_size,
        opset=args.opset,
        flags=ProfileFlags(args.batch_sizes, args.min_size, args.max_size, args.vae_batch),
        limits=model.limits,
        preview_decoder=model.preview_decoder,
        checkpoint=model.checkpoint,
        validate=not args.no_validate,
        timing_cache=args.timing_cache,
        workspace_bytes=int(args.workspace_gib * (1 << 30)),
        refittable=args.refittable,
        numerics_check=not args.skip_numerics_check,
        progress=not args.quiet,
        lora=lora_record(args),
    )
    summary = run_build(options)
    out = sys.stdout
    if summary.reused_onnx:
        print("onnx: reused the graphs already built for this model", file=out)
    else:
        print(f"export: {summary.export_seconds:.1f} s", file=out)
        if summary.validate_seconds:
            print(f"validate: {summary.validate_seconds:.1f} s", file=out)
            for line in summary.validation:
                print(f"  {line}", file=out)
    if summary.tensorrt_seconds:
        print(f"tensorrt build: {summary.tensorrt_seconds:.1f} s", file=out)
        for name, line in summary.numerics.items():
            print(f"  {name}: {line}", file=out)
    for file, size in summary.file_sizes.items():
        print(f"  {file}: {_human(size)}", file=out)
    backend = "tensorrt" if args.format == "tensorrt" else "onnxruntime"
    print(f"wrote {summary.manifest_path}", file=out)
    print(f"serve with: kiln serve --backend {backend} --engines {args.out}", file=out)
    return 0
