"""Helpers shared by the subcommands."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenprune.plugin import Runtime

__all__ = ["format_table", "runtime_from_args"]


def runtime_from_args(args: argparse.Namespace) -> Runtime:
    """A runtime with the plugins named by ``--plugin``."""
    from tokenprune.plugin import Runtime

    return Runtime(plugins=getattr(args, "plugin", []))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, columns padded for reading in a terminal.

    Examples:
        >>> print(format_table(["a", "bb"], [[1, 2]]))
        | a | bb |
        |---|----|
        | 1 | 2  |
    """
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
