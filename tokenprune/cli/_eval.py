"""``tokenprune eval``: a task x pipeline x budget grid with a resumable, data-parallel runner."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["DEFAULT_BUDGETS", "register"]

DEFAULT_BUDGETS = "1.0,0.333,0.222,0.111,0.056"
"""Budgets of ``--budgets`` (kept literal here so building the parser does not import torch)."""


def register(sub: Any) -> None:
    """Add the ``eval`` subcommand."""
    parser = sub.add_parser(
        "eval",
        help="evaluate pipelines at several budgets on a task; resumable, data-parallel",
        description=(
            "Evaluate the unpruned model and every --pipeline at every budget on a task. "
            "Writes OUT/results.jsonl (one line per pipeline, budget and sample; a re-run skips "
            "finished lines), OUT/runs.jsonl, OUT/summary.md, OUT/summary.csv and "
            "OUT/accuracy.png. Run data-parallel with --num-processes N or "
            "`accelerate launch -m tokenprune eval ...`."
        ),
    )
    parser.add_argument(
        "--model",
        default="default",
        help="'default' (the shipped toy model), a hub id or local directory of an "
        "image-text-to-text checkpoint, or package.module:factory (default: default)",
    )
    parser.add_argument(
        "--task", default="shapes", help="registered task or package.module:factory (shapes)"
    )
    parser.add_argument(
        "--pipeline",
        action="append",
        default=[],
        metavar="FILE",
        help="pipeline config (YAML/TOML/JSON), named after the file stem, or 'oracle' (the "
        "relevant tokens first, for tasks that know where the answer is); repeatable. The "
        "unpruned baseline is always included",
    )
    parser.add_argument(
        "--budgets",
        default=DEFAULT_BUDGETS,
        help=f"comma-separated ratios (0.111) or token counts (64) (default: {DEFAULT_BUDGETS})",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="questions per batch (8)")
    parser.add_argument(
        "--limit", type=int, default=None, help="questions per family (default: the task's)"
    )
    parser.add_argument("--split", default="test", help="task split (test)")
    parser.add_argument("--seed", type=int, default=0, help="task seed (0)")
    parser.add_argument("--out", default="eval-results", help="output directory (eval-results)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="generation limit (8)")
    parser.add_argument(
        "--num-processes",
        type=int,
        default=1,
        help="run N data-parallel processes through `accelerate launch` (1)",
    )
    parser.add_argument(
        "--device", default=None, help="model device (default: this process's GPU, else cpu)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def _child_argv(args: argparse.Namespace) -> list[str]:
    """The arguments that reproduce this command in each launched process."""
    argv: list[str] = []
    for plugin in args.plugin:
        argv += ["--plugin", plugin]
    argv += ["eval", "--model", args.model, "--task", args.task]
    for path in args.pipeline:
        argv += ["--pipeline", path]
    argv += ["--budgets", args.budgets, "--batch-size", str(args.batch_size)]
    if args.limit is not None:
        argv += ["--limit", str(args.limit)]
    argv += ["--split", args.split, "--seed", str(args.seed), "--out", args.out]
    argv += ["--max-new-tokens", str(args.max_new_tokens)]
    if args.device is not None:
        argv += ["--device", args.device]
    if args.no_progress:
        argv.append("--no-progress")
    return argv


def run(args: argparse.Namespace) -> int:
    """Run the evaluation (or launch it in ``--num-processes`` processes)."""
    from tokenprune.eval.parallel import current_process, launch, launched

    if args.num_processes < 1:
        raise SystemExit("error: --num-processes must be at least 1")
    if args.num_processes > 1 and not launched():
        return launch(_child_argv(args), args.num_processes)

    from tokenprune.cli._common import runtime_from_args
    from tokenprune.eval.models import load_eval_model
    from tokenprune.eval.runner import EvalSpec, load_pipeline_spec, parse_budgets, run_eval
    from tokenprune.eval.tasks import get_task

    process = current_process(cpu=True if (args.device or "").startswith("cpu") else None)
    runtime = runtime_from_args(args)
    spec = EvalSpec(
        task=get_task(args.task),
        pipelines=[load_pipeline_spec(p, runtime) for p in args.pipeline],
        budgets=parse_budgets(args.budgets),
        split=args.split,
        seed=args.seed,
        limit=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    model = load_eval_model(args.model, device=args.device or process.device)
    summary = run_eval(
        model,
        spec,
        args.out,
        process=process,
        plugins=args.plugin,
        progress=not args.no_progress,
        model_name=args.model,
    )
    if summary is not None:
        print(summary.to_markdown(), end="")
        print(f"results in {args.out}/ (results.jsonl, summary.md, summary.csv, accuracy.png)")
    return 0
