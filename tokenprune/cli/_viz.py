"""``tokenprune viz``: draw which visual tokens each pipeline keeps on one sample."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add the ``viz`` subcommand."""
    parser = sub.add_parser(
        "viz",
        help="overlay the tokens each pipeline keeps on a sample image (PNG)",
        description=(
            "Run each --pipeline's pruning on one sample and write a PNG: the image, then one "
            "panel per pipeline with kept patches outlined and dropped patches dimmed (with "
            "--merge, tinted by the kept token they are closest to)."
        ),
    )
    parser.add_argument("--model", default="default", help="as for `tokenprune eval` (default)")
    parser.add_argument("--task", default="shapes", help="task (shapes)")
    parser.add_argument("--split", default="test", help="task split (test)")
    parser.add_argument("--seed", type=int, default=0, help="task seed (0)")
    parser.add_argument("--sample", default="0", help="sample id, or its position in the split (0)")
    parser.add_argument(
        "--pipeline",
        action="append",
        required=True,
        metavar="FILE",
        help="pipeline config; repeatable (one panel each)",
    )
    parser.add_argument(
        "--budget", default=None, help="budget for every pipeline (default: each config's own)"
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="tint dropped patches by their nearest kept token (cosine similarity)",
    )
    parser.add_argument("--scale", type=int, default=4, help="image upscaling (4)")
    parser.add_argument("--out", default="viz.png", help="output PNG (viz.png)")
    parser.add_argument("--device", default="cpu", help="model device (cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Capture the selections with an observer plugin and draw them."""
    from tokenprune.cli._common import runtime_from_args
    from tokenprune.errors import ConfigError
    from tokenprune.eval.models import load_eval_model
    from tokenprune.eval.runner import Budget, capture_pruning, load_pipeline_spec
    from tokenprune.eval.tasks import EvalTaskError, get_task
    from tokenprune.viz.overlay import Panel, save_panels

    runtime = runtime_from_args(args)
    pipelines = [load_pipeline_spec(p, runtime) for p in args.pipeline]
    pipelines = [p for p in pipelines if not p.is_baseline]
    if not pipelines:
        raise ConfigError("give at least one pipeline config to draw")
    task = get_task(args.task)
    samples = task.samples(args.split, args.seed, None)
    if args.sample.isdigit():
        if int(args.sample) >= len(samples):
            raise EvalTaskError(f"sample {args.sample} is out of range (0..{len(samples) - 1})")
        sample = samples[int(args.sample)]
    else:
        found = [s for s in samples if s.id == args.sample]
        if not found:
            raise EvalTaskError(f"no sample with id {args.sample!r} in {task.name}/{args.split}")
        sample = found[0]
    budget = Budget.parse(args.budget) if args.budget else None
    model = load_eval_model(args.model, device=args.device)
    captured = capture_pruning(
        model, sample, pipelines, budget, plugins=args.plugin, with_assignment=args.merge
    )
    grid = next((r.grid for r in captured.values() if r.grid is not None), None)
    if grid is None:
        raise ConfigError("this model's visual tokens do not form one patch grid; cannot draw")
    panels = [Panel(sample.question)]
    for spec in pipelines:
        rec = captured[spec.name]
        panels.append(
            Panel(
                f"{spec.name} ({rec.keep_idx.shape[1]}/{rec.num_tokens})",
                rec.keep_idx[0],
                rec.assignment[0] if rec.assignment is not None else None,
            )
        )
    path = save_panels(args.out, sample.image, grid, panels, scale=args.scale)
    print(f"wrote {path} (sample {sample.id}: {sample.question} -> {sample.answer})")
    return 0
