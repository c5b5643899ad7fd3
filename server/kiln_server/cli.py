"""`kiln serve`: start the gRPC server (flags documented in --help)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add the `serve` subcommand to the `kiln` parser."""
    parser = subparsers.add_parser(
        "serve",
        help="serve models over gRPC",
        description=(
            "Start Kiln's gRPC server. Models are loaded and warmed up before health "
            "reports SERVING. Every flag can also be set as KILN_<NAME> in the environment "
            "(e.g. KILN_PORT) or in the [server] table of the config file; flags win. "
            "Accepted bearer tokens come from KILN_API_TOKENS (comma-separated entries "
            "TOKEN, TOKEN:admin or TOKEN:generate+admin; a bare TOKEN has the generate "
            "scope) and --api-tokens-file, never from a flag; callers send "
            "`authorization: Bearer TOKEN`. Without tokens the server binds loopback only."
        ),
    )
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind; 0 picks a free one (default 50051)")
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics at http://HOST:PORT/metrics on this port of --host; "
        "0 picks a free one (logged as metrics_port) (default: off)",
    )
    parser.add_argument("--config", type=Path, help="TOML file with [server] and [[models]]")
    parser.add_argument(
        "--backend",
        choices=("torch", "onnxruntime", "tensorrt"),
        help="runtime for the models (default: the fastest available for --engines)",
    )
    parser.add_argument(
        "--engines",
        type=Path,
        help="folder written by `kiln build-engines` (one subfolder per model)",
    )
    parser.add_argument(
        "--device",
        help="where the engines run: cuda, cuda:N or cpu (default: cuda when torch sees a GPU, "
        "else cpu)",
    )
    parser.add_argument(
        "--dtype",
        choices=("fp16", "bf16", "fp32"),
        help="torch backend precision of the UNet and text encoders (default: fp16 on a GPU, "
        "bf16 for FLUX models, whose activations overflow fp16; fp32 on the CPU); SDXL's VAE "
        "decodes in fp32 unless the model ships an fp16-safe VAE",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch backend: compile the UNet with torch.compile during warm-up (slower start)",
    )
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        default=None,
        help="torch backend on a GPU: replay each UNet batch shape from a CUDA graph "
        "captured during warm-up",
    )
    parser.add_argument("--cache-dir", type=Path, help="where built-in models are cached")
    parser.add_argument("--max-queue", type=int, help="requests allowed to wait (default 64)")
    parser.add_argument(
        "--max-batch-rows", type=int, help="UNet rows per step when a model sets none (default 8)"
    )
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        help="CPU threads per engine call (torch, onnxruntime); 0 = every core but one, "
        "which the API process keeps (default). Use fewer when other busy processes "
        "share the cores",
    )
    parser.add_argument(
        "--drain-timeout", type=float, help="seconds to let requests finish on SIGTERM (default 60)"
    )
    parser.add_argument(
        "--max-shape-groups",
        type=int,
        help="request shapes (model, size) that share the engine at once, taking turns step by "
        "step weighted by priority (default 4)",
    )
    parser.add_argument(
        "--engine-stall-seconds",
        type=float,
        help="a denoising step that makes no progress this long fails every request and exits "
        "non-zero for the supervisor (default 300)",
    )
    parser.add_argument(
        "--max-request-work",
        type=float,
        help="most work one request may ask for, in steps x outputs x megapixels (default "
        "1000, e.g. 8 images of 1024x1024 at 119 steps); more is INVALID_ARGUMENT",
    )
    parser.add_argument(
        "--max-image-mb",
        type=int,
        help="largest encoded `image` or `mask` a request may send, MiB (default 20); "
        "--max-message-mb must fit two of them",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        help="most pixels a request image or mask may decode to (default 16777216, 4096x4096)",
    )
    parser.add_argument(
        "--max-message-mb", type=int, help="largest gRPC message in MiB (default 64)"
    )
    parser.add_argument(
        "--api-tokens-file",
        type=Path,
        metavar="FILE",
        help="accept the bearer tokens in FILE too: one entry per line as in KILN_API_TOKENS "
        "(TOKEN, TOKEN:admin, TOKEN:generate+admin), blank lines and # comments skipped",
    )
    parser.add_argument(
        "--tls-cert", type=Path, metavar="FILE", help="serve TLS with this PEM certificate (chain)"
    )
    parser.add_argument(
        "--tls-key", type=Path, metavar="FILE", help="unencrypted PEM private key of --tls-cert"
    )
    parser.add_argument(
        "--tls-client-ca",
        type=Path,
        metavar="FILE",
        help="mutual TLS: require and verify a client certificate signed by a CA in this PEM "
        "file (needs --tls-cert and --tls-key); a client certificate then authenticates the "
        "caller, so a non-loopback --host needs no tokens",
    )
    parser.add_argument(
        "--allow-plaintext-tokens",
        action="store_true",
        default=None,
        help="accept tokens over plain text on a non-loopback --host, e.g. when a "
        "TLS-terminating proxy sits in front (refused otherwise)",
    )
    parser.add_argument(
        "--max-inflight-per-token",
        type=int,
        metavar="N",
        help="Generate calls one token may have in flight; one more is RESOURCE_EXHAUSTED "
        "with RetryInfo (default 32; 0: no limit)",
    )
    parser.add_argument(
        "--health-port",
        type=int,
        metavar="P",
        help="also answer grpc.health.v1 (and nothing else) in plain text on this port of "
        "--host, for probes that cannot speak TLS such as Kubernetes' gRPC probes; 0 picks a "
        "free one (the log says which) (default: off)",
    )
    parser.add_argument(
        "--max-connection-age",
        type=float,
        metavar="S",
        help="close each client connection after S seconds (its calls finish first), so "
        "round_robin clients re-resolve DNS and reach replicas added since; 0: never "
        "(default 300)",
    )
    parser.add_argument(
        "--lora-slots",
        type=int,
        metavar="N",
        help="LoRAs kept resident per model, least recently used evicted first (default 8)",
    )
    parser.add_argument(
        "--max-lora-rank",
        type=int,
        metavar="R",
        help="highest LoRA rank accepted; files above it are refused (default 128)",
    )
    parser.add_argument(
        "--max-loras-per-request",
        type=int,
        metavar="N",
        help="LoRAs one request may apply at once (default 4)",
    )
    parser.add_argument(
        "--model-memory-budget",
        metavar="SIZE",
        help="device memory the resident models may hold together, e.g. 40GiB; models "
        "beyond it load on first use and the least recently used idle one is unloaded "
        "(default: none, every configured model stays resident)",
    )
    parser.add_argument(
        "--lora-cache-dir",
        type=Path,
        metavar="DIR",
        help="where LoRAs imported by the admin API are kept (default <cache dir>/loras)",
    )
    parser.add_argument(
        "--lora-cache-size",
        metavar="SIZE",
        help="most bytes of imported LoRAs kept; the least recently used go first (default 10GiB)",
    )
    parser.add_argument("--log-format", choices=("auto", "json", "text"), help="log style")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    parser.add_argument("--port-file", type=Path, help="write the bound port to this file")
    parser.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """Resolve settings and models, then run the server until it is told to stop."""
    from kiln_server.auth import read_tls
    from kiln_server.logs import configure_logging
    from kiln_server.models.loader import ModelFolderError
    from kiln_server.models.registry import ModelRegistry, RegistryError
    from kiln_server.server import run_server
    from kiln_server.settings import SettingsError, load_settings

    flags = {k: v for k, v in vars(args).items() if k not in ("handler", "command")}
    try:
        settings, config = load_settings(flags)
        tls = read_tls(settings)
    except SettingsError as error:
        print(f"kiln serve: {error}", file=sys.stderr)
        return 2
    # The API process reads the tokenizers with transformers.
    configure_logging(settings.log_format, settings.log_level, ("transformers",))
    log = logging.getLogger("kiln_server")
    try:
        registry = ModelRegistry.from_config(config, settings.cache_dir)
    except RegistryError as error:  # the config's [[models]] are wrong: a settings error
        print(f"kiln serve: {error}", file=sys.stderr)
        return 2
    try:
        log.info("starting with models: %s", ", ".join(registry.models))
        return asyncio.run(run_server(settings, registry, args.port_file, tls))
    except (RegistryError, ModelFolderError, OSError) as error:
        log.error("cannot start: %s", error)
        print(f"kiln serve: {error}", file=sys.stderr)
        return 1
