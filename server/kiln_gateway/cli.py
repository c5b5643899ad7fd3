"""`kiln gateway`: run the Replicate-compatible HTTP API in front of a Kiln gRPC server."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add the `gateway` subcommand to the `kiln` parser (heavy imports wait for the handler)."""
    parser = subparsers.add_parser(
        "gateway",
        help="serve Replicate's HTTP predictions API in front of a Kiln server",
        description=(
            "Serve Replicate's predictions API (the official clients work unchanged once "
            "REPLICATE_BASE_URL points here) and forward every prediction to the Kiln gRPC "
            "server at --upstream. Accepted bearer tokens come from KILN_API_TOKENS "
            "(comma-separated; TOKEN:admin gives a token the admin scope, which sees every "
            "prediction); without tokens the gateway only listens on loopback. Predictions "
            "are kept in --database and survive restarts. Other settings can also come from "
            "KILN_GATEWAY_<NAME> variables or the [gateway] table of --config; flags win."
        ),
    )
    parser.add_argument(
        "--upstream",
        metavar="H:P[,H:P]",
        help="Kiln gRPC server (default 127.0.0.1:50051); several comma-separated IP:PORT, "
        "or dns:///NAME:PORT for every address of a name, share the predictions round-robin",
    )
    upstream = parser.add_argument_group(
        "reaching the Kiln server (the bearer token sent to it comes from KILN_API_TOKEN)"
    )
    upstream.add_argument(
        "--upstream-tls-ca",
        type=Path,
        metavar="FILE",
        help="CA bundle (PEM) that signed the Kiln server's certificate: connect over TLS",
    )
    upstream.add_argument(
        "--upstream-tls-cert",
        type=Path,
        metavar="FILE",
        help="client certificate (PEM) for a Kiln server that requires mutual TLS; needs "
        "--upstream-tls-key",
    )
    upstream.add_argument(
        "--upstream-tls-key", type=Path, metavar="FILE", help="private key of --upstream-tls-cert"
    )
    upstream.add_argument(
        "--upstream-tls-server-name",
        metavar="NAME",
        help="name the Kiln server's certificate carries, when it is not the --upstream host",
    )
    upstream.add_argument(
        "--upstream-allow-plaintext-token",
        action="store_true",
        default=None,
        help="send KILN_API_TOKEN to a non-loopback --upstream without TLS (only over a "
        "private path, e.g. a TLS-terminating proxy on the same host)",
    )
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind; 0 picks a free one (default 8080)")
    parser.add_argument("--config", type=Path, help="TOML file with a [gateway] table")
    parser.add_argument(
        "--public-url",
        metavar="URL",
        help="base URL clients use to reach the gateway, for prediction and file URLs "
        "(default: the URL each request came in on)",
    )
    parser.add_argument(
        "--allowed-hosts",
        metavar="HOST[,HOST]",
        help="Host header names the gateway answers to without --public-url, besides "
        "loopback and its bind address (* for any)",
    )
    parser.add_argument(
        "--database",
        metavar="URL",
        help="where predictions are kept: sqlite:///PATH (one gateway) or "
        "postgresql://USER:PASSWORD@HOST/NAME (replicas share it); default: "
        "sqlite:///<files dir>/data/predictions.db",
    )
    parser.add_argument(
        "--retention-seconds",
        type=float,
        help="how long output files and prediction data stay available (default 3600)",
    )
    parser.add_argument(
        "--alias",
        action="append",
        metavar="OWNER/NAME[:VERSION]=MODEL",
        help="serve OWNER/NAME (optionally a pinned Replicate version id) with Kiln model MODEL; "
        "repeatable, e.g. --alias stability-ai/sdxl=sdxl-base",
    )
    parser.add_argument(
        "--output-mode",
        choices=("auto", "url", "data-uri"),
        help="return outputs as gateway file URLs, as inline data URIs, or auto (the default): "
        "URLs when the public URL is https, data URIs on plain HTTP (the official client reads "
        "only https: and data: outputs)",
    )
    parser.add_argument(
        "--files-dir",
        type=Path,
        help="the gateway's folder: output files, uploads to /v1/files and the default "
        "database (default: ~/.local/share/kiln/gateway)",
    )
    parser.add_argument(
        "--max-lora-bytes",
        type=int,
        metavar="N",
        help="largest LoRA (.safetensors, or a .tar holding one) fetched from a "
        "replicate_weights / lora_weights / extra_lora URL (default 512 MiB)",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        metavar="N",
        help="largest request body; larger ones get 413 unread (default: two "
        "--max-input-bytes images as data URIs plus 1 MiB)",
    )
    parser.add_argument(
        "--max-files-bytes",
        type=int,
        metavar="N",
        help="cap on output files kept; the oldest are removed first (default 10 GiB)",
    )
    parser.add_argument(
        "--max-inline-bytes",
        type=int,
        metavar="N",
        help="cap on data-URI outputs kept in the database (default 1 GiB)",
    )
    parser.add_argument(
        "--lease-seconds",
        type=float,
        metavar="S",
        help="how soon a running prediction of a replica that died is re-submitted by "
        "another (default 15)",
    )
    parser.add_argument(
        "--max-input-bytes",
        type=int,
        metavar="N",
        help="largest image or mask input and largest upload to /v1/files (default 20 MiB)",
    )
    parser.add_argument(
        "--upload-expiry-seconds",
        type=float,
        metavar="S",
        help="how long files uploaded to /v1/files stay available (default 86400)",
    )
    parser.add_argument(
        "--fetch-timeout-seconds",
        type=float,
        metavar="S",
        help="time limit for fetching one http(s) image or mask input (default 15)",
    )
    parser.add_argument(
        "--allow-private-urls",
        action="store_true",
        default=None,
        help="also fetch http(s) inputs from loopback, private, link-local and other "
        "non-public addresses (refused by default: only for trusted callers)",
    )
    parser.add_argument(
        "--webhook-allowed-hosts",
        metavar="HOST[,HOST]",
        help="host names, addresses or CIDR networks webhooks may reach although they are "
        "not public (default: public addresses only)",
    )
    parser.add_argument("--tls-certfile", type=Path, help="serve HTTPS with this certificate")
    parser.add_argument("--tls-keyfile", type=Path, help="private key of --tls-certfile")
    parser.add_argument("--log-format", choices=("auto", "json", "text"), help="log style")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    parser.add_argument("--port-file", type=Path, help="write the bound port to this file")
    parser.set_defaults(handler=run_gateway)


class _Terminated(Exception):
    """SIGTERM arrived; raised once uvicorn has shut down gracefully (or before it started)."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated


def run_gateway(args: argparse.Namespace) -> int:
    """Resolve settings, refuse unsafe ones, then serve until interrupted; returns the exit code."""
    from kiln_gateway.settings import SettingsError, is_loopback, load_settings

    flags = {k: v for k, v in vars(args).items() if k not in ("handler", "command")}
    try:
        settings = load_settings(flags)
    except SettingsError as error:
        print(f"kiln gateway: {error}", file=sys.stderr)
        return 2
    if not settings.auth_enabled and not is_loopback(settings.host):
        print(
            f"kiln gateway: refusing to listen on {settings.host} without API tokens: anyone "
            "who can reach it could run generations. Set KILN_API_TOKENS=token1,token2 "
            "(comma-separated bearer tokens) or bind to 127.0.0.1.",
            file=sys.stderr,
        )
        return 2
    for path in (settings.tls_certfile, settings.tls_keyfile):
        if path is not None and not path.is_file():
            print(f"kiln gateway: TLS file {path} does not exist", file=sys.stderr)
            return 2
    from kiln_client.connection import ConnectionSettingsError
    from kiln_gateway.app import UPSTREAM_FLAGS, upstream_connection

    try:
        upstream_connection(settings)
    except ConnectionSettingsError as error:
        print(f"kiln gateway: {error.message_for(UPSTREAM_FLAGS)}", file=sys.stderr)
        return 2

    import asyncio
    import logging

    from kiln_gateway.database import DatabaseError
    from kiln_gateway.server import serve
    from kiln_server.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    log = logging.getLogger("kiln_gateway")
    if not settings.auth_enabled:
        log.warning(
            "no API tokens configured (KILN_API_TOKENS is empty): authentication is OFF and "
            "the gateway listens on loopback %s only",
            settings.host,
        )
    if not settings.public_url and not settings.allowed_hosts and not is_loopback(settings.host):
        from kiln_gateway.guard import allowed_host_names

        log.warning(
            "no --public-url or --allowed-hosts: only requests whose Host header is one of "
            "%s are answered (others get 400); set --public-url to the URL clients use",
            ", ".join(sorted(allowed_host_names(settings) or ())),
        )
    # uvicorn shuts down gracefully on SIGTERM and then re-raises the signal; this handler
    # turns that into a clean exit (0) instead of death by signal.
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        asyncio.run(serve(settings, port_file=args.port_file))
    except DatabaseError as error:
        log.error("cannot start: %s", error)
        print(f"kiln gateway: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        log.error("cannot start: %s", error)
        print(f"kiln gateway: {error}", file=sys.stderr)
        return 1
    except _Terminated:
        log.info("gateway stopped")
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run `kiln gateway` on its own (`python -m kiln_gateway.cli`)."""
    parser = argparse.ArgumentParser(prog="kiln")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["gateway", *(sys.argv[1:] if argv is None else argv)])
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
