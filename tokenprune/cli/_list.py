"""``tokenprune list``: plugins and what each provides."""

from __future__ import annotations

import argparse
import json
from typing import Any

from tokenprune.cli._common import format_table, runtime_from_args

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add the ``list`` subcommand."""
    parser = sub.add_parser("list", help="list plugins, stages and adapters")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print every registered stage and adapter with the plugin that provides it."""
    runtime = runtime_from_args(args)
    rows = [(r.role, r.name, r.plugin, r.provider) for r in [*runtime.stages, *runtime.adapters]]
    if args.json:
        payload = {
            "components": [
                dict(zip(("role", "name", "plugin", "provider"), r, strict=True)) for r in rows
            ],
            "plugins": [vars(p) for p in runtime.plugins],
            "failures": [str(f) for f in runtime.failures],
        }
        print(json.dumps(payload, indent=2))
        return 0
    print(format_table(["role", "name", "plugin", "provided by"], rows))
    print()
    print(
        format_table(
            ["plugin", "provided by", "source"],
            [(p.name, p.provider, p.source) for p in runtime.plugins],
        )
    )
    for failure in runtime.failures:
        print(f"\nfailed: {failure}")
    return 0
