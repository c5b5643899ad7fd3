"""`python -m kiln_server ARGS` runs `kiln serve ARGS` without going through the `kiln` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kiln_server import cli


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `kiln serve`'s flags and serve; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m kiln_server")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
