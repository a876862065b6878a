"""Tables the results page quotes, computed from the per-question results of ``make results``.

Usage::

    .venv/bin/python benchmarks/results_tables.py [docs/results/shapes/results.jsonl] \
        [--pair desap_11pct desap_dynamic_11pct] [--budgets 0.111,0.056]

Prints, in Markdown:

- overall accuracy (%) per pipeline and budget with its 95 % Wilson interval, the unpruned model
  in the heading;
- the share (%) of well-formed answers per pipeline and budget: an answer is well-formed when,
  after normalisation, it is one of the answers its family can have (a colour, ``yes`` / ``no``,
  a number word, or "<colour> <shape>"), whether right or wrong;
- the relevant-token recall (%) per pipeline and budget: the mean share of the patches of the
  objects a question is about that the pipeline kept (records with ``relevant_total`` > 0);
- with ``--pair A B``, a paired comparison of two pipelines on the same questions, per budget and
  family: accuracies, difference, the questions that only one of them answers correctly, and the
  two-sided exact sign test on those.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from tokenprune.eval.report import wilson_interval
from tokenprune.toy.task import FAMILIES, is_well_formed

Runs = dict[tuple[str, str], dict[str, dict[str, Any]]]
"""``{(pipeline, budget): {sample_id: record}}``."""


def sign_test(a: int, b: int) -> float:
    """Two-sided exact sign test of ``a`` against ``b`` discordant pairs (p = 1 when none)."""
    n = a + b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(a, b) + 1)) / float(2**n)
    return min(1.0, 2 * tail)


def load(path: Path) -> Runs:
    """Return ``{(pipeline, budget): {sample_id: record}}``."""
    runs: Runs = defaultdict(dict)
    with path.open() as f:
        for line in f:
            r = json.loads(line)
            runs[(r["pipeline"], r["budget"])][r["sample_id"]] = r
    return runs


def grid(runs: Runs, value: str) -> str:
    """Markdown table of ``value`` (``accuracy``, ``well-formed`` or ``recall``) per pipeline
    and budget."""
    budgets = sorted({b for _, b in runs if b != "full"}, key=float, reverse=True)
    pipelines = sorted({p for p, b in runs if b != "full"})

    def cell(records: dict[str, dict[str, Any]]) -> str:
        if value == "recall":
            known = [r for r in records.values() if r.get("relevant_total")]
            if not known or any(r.get("relevant_kept") is None for r in known):
                return "-"
            shares = [r["relevant_kept"] / r["relevant_total"] for r in known]
            return f"{100 * sum(shares) / len(shares):.1f}"
        if value == "accuracy":
            hits = sum(r["correct"] for r in records.values())
            low, high = wilson_interval(hits, len(records))
            return f"{100 * hits / len(records):.1f} ({100 * low:.1f}-{100 * high:.1f})"
        hits = sum(is_well_formed(r["prediction"], r["family"]) for r in records.values())
        return f"{100 * hits / len(records):.1f}"

    full = runs.get(("unpruned", "full"))
    head = f"{value} in % (unpruned: {cell(full)})" if full else f"{value} in %"
    lines = [f"| {head} | " + " | ".join(budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for p in pipelines:
        cells = [cell(runs[(p, b)]) if (p, b) in runs else "" for b in budgets]
        lines.append(f"| `{p}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(runs: Runs, a: str, b: str, budgets: list[str]) -> str:
    """Markdown table comparing pipelines ``a`` and ``b`` question by question."""
    lines = [
        f"| budget | family | {a} | {b} | Δ | {a} only right | {b} only right | p |",
        "|---" * 8 + "|",
    ]
    for budget in budgets:
        ra, rb = runs[(a, budget)], runs[(b, budget)]
        if ra.keys() != rb.keys():
            raise SystemExit(f"{a} and {b} at {budget} answered different questions")
        for family in (*FAMILIES, "overall"):
            ids = [i for i in ra if family == "overall" or ra[i]["family"] == family]
            acc_a = 100 * sum(ra[i]["correct"] for i in ids) / len(ids)
            acc_b = 100 * sum(rb[i]["correct"] for i in ids) / len(ids)
            only_a = sum(ra[i]["correct"] and not rb[i]["correct"] for i in ids)
            only_b = sum(rb[i]["correct"] and not ra[i]["correct"] for i in ids)
            lines.append(
                f"| {budget} | {family} | {acc_a:.1f} | {acc_b:.1f} | {acc_b - acc_a:+.1f} "
                f"| {only_a} | {only_b} | {sign_test(only_a, only_b):.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "results", nargs="?", type=Path, default=Path("docs/results/shapes/results.jsonl")
    )
    parser.add_argument("--pair", nargs=2, metavar=("A", "B"))
    parser.add_argument("--budgets", default="0.111,0.056")
    args = parser.parse_args()
    if not args.results.is_file():
        raise SystemExit(f"{args.results} not found: run `make results` first")
    runs = load(args.results)
    print(grid(runs, "accuracy"), end="\n\n")
    print(grid(runs, "well-formed"), end="\n\n")
    print(grid(runs, "recall"), end="\n\n")
    if args.pair:
        a, b = args.pair
        print(paired(runs, a, b, args.budgets.split(",")))


if __name__ == "__main__":
    main()
