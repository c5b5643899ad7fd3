"""The `kiln` command: one console script whose subcommands live with the code they drive.

Each subcommand module exposes `register(subparsers)`, which adds its parser and sets
`handler` to a function taking the parsed arguments and returning an exit code. Modules
import their heavy dependencies (torch, grpc servers) only when run, so `kiln --help` is fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The full `kiln` argument parser with every subcommand registered."""
    from kiln_build import cli as build_cli
    from kiln_client import generate_cli
    from kiln_gateway import cli as gateway_cli
    from kiln_server import cli as server_cli

    parser = argparse.ArgumentParser(
        prog="kiln",
        description="Kiln: self-hosted SDXL image generation over gRPC.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    server_cli.register(subparsers)
    generate_cli.register(subparsers)
    build_cli.register(subparsers)
    gateway_cli.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the chosen subcommand, and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
