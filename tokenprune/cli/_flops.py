"""``tokenprune flops``: analytic prefill FLOPs and KV cache before and after pruning.

Registered by :mod:`tokenprune.cli` through :func:`register`; the computation lives in
:mod:`tokenprune.bench.flops` (pure Python, no torch).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import TYPE_CHECKING, cast

from tokenprune.bench.flops import (
    CONVENTIONS,
    SCOPES,
    format_table,
    list_presets,
    load_shape,
    pipeline_schedule,
    prefill_flops,
)
from tokenprune.errors import ConfigError, TokenPruneError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from tokenprune.bench.flops import Convention, FlopsResult, Scope

__all__ = ["handler", "register"]

_COUNT = re.compile(r"\d+")
_RATIO = re.compile(r"(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][-+]?\d+)")

_EPILOG = """\
token budgets: a count (64) or a ratio of the model's full count N (0.111 -> round-half-up(0.111 N),
at least 1). A stage LAYER:TOKENS makes LLM layers >= LAYER see TOKENS visual tokens (FastV-style);
stage tokens may be ratios of N too.

examples:
  tokenprune flops --model llava-1.5-7b --tokens 576,192,128,64 --convention desap
  tokenprune flops --model llava-1.5-7b --tokens 64 --text-tokens 60 --include-vision
  tokenprune flops --model llava-1.5-7b --tokens 576 --stage 2:0.25 --json
  tokenprune flops --model llava-1.5-7b --config configs/desap192_fastv64.yaml

--config reads a pipeline config (file, saved directory or preset): its encoder budget gives the
tokens entering layer 0, and each LLM stage (llm: [{layer: K, keep...}]) the tokens of layers >= K.
"""


def _budget(text: str) -> int | float:
    """Parse one token budget: digits are a count, a decimal number is a ratio of N."""
    text = text.strip()
    if _COUNT.fullmatch(text):
        return int(text)
    if _RATIO.fullmatch(text):
        return float(text)
    raise argparse.ArgumentTypeError(
        f"invalid token budget {text!r}: expected a count like 64 or a ratio like 0.111"
    )


def _token_list(text: str) -> list[int | float]:
    """Parse ``--tokens``: comma-separated counts and/or ratios."""
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("--tokens needs at least one count or ratio")
    return [_budget(item) for item in items]


def _stage(text: str) -> tuple[int, int | float]:
    """Parse one ``--stage LAYER:TOKENS``."""
    layer, sep, tokens = text.partition(":")
    if not sep or not _COUNT.fullmatch(layer.strip()):
        raise argparse.ArgumentTypeError(
            f"malformed stage {text!r}: expected LAYER:TOKENS, for example 2:144 or 2:0.25"
        )
    try:
        return int(layer), _budget(tokens)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"malformed stage {text!r}: {exc}") from None


def _non_negative(text: str) -> int:
    if not _COUNT.fullmatch(text.strip()):
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}")
    return int(text)


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``flops`` subcommand.

    Args:
        subparsers: The ``add_subparsers()`` object of the ``tokenprune`` parser. The new parser
            sets ``func=handler``.
    """
    parser = subparsers.add_parser(
        "flops",
        help="analytic prefill FLOPs and KV-cache size before and after visual-token pruning",
        description=(
            "Analytic prefill FLOPs and KV-cache size of a VLM at the given visual-token "
            "budgets, with the ratio to the unpruned run. Pure arithmetic on the model shape: "
            "no weights are loaded. For measured latency see `tokenprune bench`."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="NAME",
        help=f"preset ({', '.join(list_presets())}), a directory containing config.json, "
        "or a hub id owner/name",
    )
    parser.add_argument(
        "--tokens",
        type=_token_list,
        default=None,
        metavar="LIST",
        help="comma-separated visual-token budgets, counts or ratios of N (default: N)",
    )
    parser.add_argument(
        "--text-tokens",
        type=_non_negative,
        default=None,
        metavar="T",
        help="text tokens in the prompt; implies --scope prefill",
    )
    parser.add_argument(
        "--convention",
        choices=list(CONVENTIONS),
        default="fastv",
        help="per-layer formula: fastv = 4nd^2+2n^2d+2ndm, desap = 4nd^2+2n^2d+3ndm "
        "(default: fastv)",
    )
    parser.add_argument(
        "--scope",
        choices=list(SCOPES),
        default=None,
        help="visual: visual tokens only (the papers' numbers); prefill: visual + text tokens "
        "(default: prefill if --text-tokens is given, else visual)",
    )
    parser.add_argument(
        "--include-vision",
        action="store_true",
        help="add the vision-encoder FLOPs (unchanged by pruning) to every run",
    )
    parser.add_argument(
        "--stage",
        type=_stage,
        action="extend",
        nargs="+",
        default=None,
        metavar="LAYER:TOKENS",
        help="LLM layers >= LAYER see TOKENS visual tokens (count or ratio of N); repeatable",
    )
    parser.add_argument(
        "--config",
        default=None,
        metavar="PIPELINE",
        help="take the budgets from a pipeline config (file, saved directory or preset), "
        "including its LLM stages; replaces --tokens and --stage",
    )
    parser.add_argument(
        "--full-tokens",
        type=_positive,
        default=None,
        metavar="N",
        help="override the unpruned visual-token count N (e.g. Qwen2.5-VL for your image size)",
    )
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        help="KV-cache dtype (default: bfloat16)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=handler)


def _compute(args: argparse.Namespace) -> tuple[str, list[FlopsResult]]:
    scope = args.scope or ("prefill" if args.text_tokens is not None else "visual")
    if scope == "prefill" and args.text_tokens is None:
        raise ConfigError("--scope prefill needs --text-tokens")
    if scope == "visual" and args.text_tokens:
        raise ConfigError(
            "--text-tokens counts only with --scope prefill; --scope visual counts visual "
            "tokens only"
        )
    shape = load_shape(args.model, visual_tokens=args.full_tokens)
    runs: list[tuple[int | float | None, Sequence[tuple[int, int | float]]]]
    if args.config is not None:
        if args.tokens is not None or args.stage:
            raise ConfigError("--config gives the budgets; drop --tokens and --stage")
        from tokenprune.plugin import Runtime

        config = Runtime().load_config(args.config)
        runs = [pipeline_schedule(config, shape.visual_tokens)]
    else:
        runs = [(tokens, args.stage or ()) for tokens in (args.tokens or [None])]
    results = [
        prefill_flops(
            shape,
            tokens,
            convention=cast("Convention", args.convention),
            scope=cast("Scope", scope),
            text_tokens=args.text_tokens or 0,
            include_vision=args.include_vision,
            stages=stages,
            dtype=args.dtype,
        )
        for tokens, stages in runs
    ]
    return shape.source, results


def handler(args: argparse.Namespace) -> int:
    """Run ``tokenprune flops``: print a Markdown table (or JSON with ``--json``).

    Args:
        args: Parsed arguments of the ``flops`` parser.

    Returns:
        0 on success, 2 on invalid input (the message goes to stderr).
    """
    try:
        source, results = _compute(args)
    except TokenPruneError as exc:
        print(f"tokenprune flops: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        print(format_table(results))
        if source:
            print(f"- model shape: {source}.")
    return 0
