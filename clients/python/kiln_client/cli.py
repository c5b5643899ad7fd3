"""The `kiln` command: one console script whose subcommands come from every installed distribution.

This distribution (kiln-client) brings `generate` and `models`; the server distribution adds
`serve`, `build-engines`, `gateway` and `cost`. Each registers itself in the `kiln.commands`
entry-point group as a function `register(subparsers)`, which adds its parsers and sets
`handler` to a function taking the parsed arguments and returning an exit code. The client
therefore never imports the server, and modules import their heavy dependencies (torch,
grpc servers) only when run, so `kiln --help` is fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import EntryPoint, entry_points

ENTRY_POINT_GROUP = "kiln.commands"
"""The entry-point group whose members add subcommands to `kiln`."""


def _command_entry_points() -> list[EntryPoint]:
    # The client's own commands first, then the rest by name, so --help reads the same
    # whichever distributions are installed.
    found = {entry.name: entry for entry in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(found.values(), key=lambda entry: (entry.name != "client", entry.name))


def build_parser() -> argparse.ArgumentParser:
    """The full `kiln` argument parser with every installed subcommand registered.

    A command whose distribution is broken is left out with a warning on stderr; the others
    still work.
    """
    parser = argparse.ArgumentParser(
        prog="kiln",
        description="Kiln: self-hosted image generation over gRPC.",
        epilog="`pip install kiln-client` gives generate and models; the server "
        "distribution (kiln) adds serve, build-engines, gateway and cost.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for entry in _command_entry_points():
        try:
            register = entry.load()
        except Exception as error:  # a broken plug-in must not take `kiln generate` down
            print(
                f"kiln: commands {entry.name!r} ({entry.value}) failed to load and are left "
                f"out: {type(error).__name__}: {error}. Reinstall the distribution providing "
                "them.",
                file=sys.stderr,
            )
            continue
        register(subparsers)
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
