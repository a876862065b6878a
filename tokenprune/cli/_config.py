"""``tokenprune config``: validate a pipeline config, print the JSON schema."""

from __future__ import annotations

import argparse
import json
from typing import Any

from tokenprune.cli._common import runtime_from_args

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add the ``config`` subcommand group."""
    parser = sub.add_parser("config", help="validate pipeline configs, print their schema")
    group = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    validate = group.add_parser("validate", help="check a YAML/TOML/JSON pipeline config")
    validate.add_argument("path", help="config file")
    validate.set_defaults(func=run_validate)
    schema = group.add_parser("schema", help="print the JSON schema of pipeline configs")
    schema.set_defaults(func=run_schema)


def run_validate(args: argparse.Namespace) -> int:
    """Validate one file; errors name the offending field (exit status 2)."""
    config = runtime_from_args(args).load_config(args.path)
    print(f"{args.path}: valid")
    print(json.dumps(config.to_dict(), indent=2))
    return 0


def run_schema(args: argparse.Namespace) -> int:
    """Print the JSON schema, covering every registered stage."""
    print(json.dumps(runtime_from_args(args).config_model().model_json_schema(), indent=2))
    return 0
