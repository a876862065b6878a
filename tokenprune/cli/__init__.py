"""The ``tokenprune`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tokenprune.errors import TokenPruneError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    from tokenprune import __version__
    from tokenprune.cli import _bench, _config, _demo, _eval, _flops, _list, _toy, _viz

    parser = argparse.ArgumentParser(
        prog="tokenprune",
        description="Training-free visual-token pruning for vision-language models.",
    )
    parser.add_argument("--version", action="version", version=f"tokenprune {__version__}")
    parser.add_argument(
        "-p",
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="load this plugin module too (repeatable)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = [_list, _config, _demo, _eval, _viz, _flops, _bench, _toy]
    for module in modules:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
    except TokenPruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
