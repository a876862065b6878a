"""Summaries of evaluation results: accuracy per family, retention vs unpruned, table and plot.

Retention is the accuracy of a (pipeline, budget) divided by the unpruned model's accuracy on
the *same samples*, in percent: 100% means pruning lost nothing.

Examples:
    >>> recs = [
    ...     {"pipeline": "unpruned", "budget": "full", "sample_id": "a", "family": "x",
    ...      "correct": True, "kept_tokens": None, "total_tokens": None},
    ...     {"pipeline": "unpruned", "budget": "full", "sample_id": "b", "family": "x",
    ...      "correct": True, "kept_tokens": None, "total_tokens": None},
    ...     {"pipeline": "random", "budget": "0.5", "sample_id": "a", "family": "x",
    ...      "correct": True, "kept_tokens": [8], "total_tokens": [16]},
    ...     {"pipeline": "random", "budget": "0.5", "sample_id": "b", "family": "x",
    ...      "correct": False, "kept_tokens": [8], "total_tokens": [16]},
    ... ]
    >>> s = summarize(recs, [("unpruned", "full"), ("random", "0.5")], families=["x"])
    >>> [(r.pipeline, r.accuracy, r.retention, r.kept_tokens) for r in s.rows]
    [('unpruned', 1.0, 1.0, 16.0), ('random', 0.5, 0.5, 8.0)]
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BASELINE",
    "FULL_BUDGET",
    "Summary",
    "SummaryRow",
    "plot_accuracy",
    "summarize",
    "write_report",
]

BASELINE = "unpruned"
"""Name of the unpruned baseline pipeline."""
FULL_BUDGET = "full"
"""Budget label of the unpruned baseline."""


@dataclass(frozen=True)
class SummaryRow:
    """Scores of one (pipeline, budget).

    Attributes:
        pipeline: Pipeline name (``unpruned`` for the baseline).
        budget: Budget label as given (``full`` for the baseline).
        samples: Number of scored samples.
        kept_tokens: Mean visual tokens per sample that reached the language model (summed over
            the sample's images); ``None`` if unknown.
        family_accuracy: Accuracy per family in ``[0, 1]`` (``None``: no sample of the family).
        accuracy: Overall accuracy in ``[0, 1]``.
        retention: ``accuracy / unpruned accuracy`` on the same samples; ``None`` without a
            baseline or when the baseline scores zero.
    """

    pipeline: str
    budget: str
    samples: int
    kept_tokens: float | None
    family_accuracy: Mapping[str, float | None]
    accuracy: float
    retention: float | None


@dataclass(frozen=True)
class Summary:
    """The table of a run: one :class:`SummaryRow` per (pipeline, budget), in grid order."""

    families: tuple[str, ...]
    rows: list[SummaryRow] = field(default_factory=list)

    def headers(self) -> list[str]:
        """Column names of the table."""
        return [
            "pipeline",
            "budget",
            "visual tokens",
            *self.families,
            "overall",
            "retention",
            "samples",
        ]

    def table(self) -> list[list[str]]:
        """The rows as formatted strings (percentages with one decimal)."""
        out = []
        for r in self.rows:
            out.append(
                [
                    r.pipeline,
                    r.budget,
                    _fmt_tokens(r.kept_tokens),
                    *(_pct(r.family_accuracy.get(f)) for f in self.families),
                    _pct(r.accuracy),
                    _pct(r.retention),
                    str(r.samples),
                ]
            )
        return out

    def to_markdown(self) -> str:
        """The table as Markdown (accuracy and retention in percent)."""
        return _markdown(self.headers(), self.table())

    def to_csv(self) -> str:
        """The table as CSV (fractions, not percentages; empty cells for unknown values)."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.headers())
        for r in self.rows:
            writer.writerow(
                [
                    r.pipeline,
                    r.budget,
                    _num(r.kept_tokens),
                    *(_num(r.family_accuracy.get(f)) for f in self.families),
                    _num(r.accuracy),
                    _num(r.retention),
                    r.samples,
                ]
            )
        return buf.getvalue()


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def _fmt_tokens(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    cells = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines) + "\n"


def _mean(values: Iterable[float]) -> float | None:
    items = list(values)
    return sum(items) / len(items) if items else None


def summarize(
    records: Iterable[Mapping[str, Any]],
    grid: Sequence[tuple[str, str]],
    *,
    families: Sequence[str] = (),
) -> Summary:
    """Score every (pipeline, budget) of ``grid`` from the per-sample records.

    Args:
        records: Result records (``results.jsonl`` lines); records outside ``grid`` are ignored.
        grid: ``(pipeline, budget)`` pairs in table order; the baseline is
            ``("unpruned", "full")``.
        families: Family columns in order; families seen in the records but not listed are
            appended in order of appearance.

    Returns:
        The summary.
    """
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {key: [] for key in grid}
    fams = list(families)
    for rec in records:
        key = (str(rec["pipeline"]), str(rec["budget"]))
        if key in groups:
            groups[key].append(rec)
            if rec["family"] not in fams:
                fams.append(str(rec["family"]))
    baseline = {
        str(r["sample_id"]): bool(r["correct"]) for r in groups.get((BASELINE, FULL_BUDGET), [])
    }
    # Tokens of the unpruned model: the full counts seen by any pruned run.
    full_tokens = _mean(
        float(sum(r["total_tokens"]))
        for recs in groups.values()
        for r in recs
        if r.get("total_tokens")
    )
    rows = []
    for (pipeline, budget), recs in groups.items():
        if not recs:
            continue
        fam_acc: dict[str, float | None] = {
            f: _mean(float(bool(r["correct"])) for r in recs if r["family"] == f) for f in fams
        }
        accuracy = _mean(float(bool(r["correct"])) for r in recs)
        assert accuracy is not None
        same = [r for r in recs if str(r["sample_id"]) in baseline]
        base_acc = _mean(float(baseline[str(r["sample_id"])]) for r in same)
        own_acc = _mean(float(bool(r["correct"])) for r in same)
        retention = own_acc / base_acc if own_acc is not None and base_acc else None
        if pipeline == BASELINE and budget == FULL_BUDGET:
            kept = full_tokens
        else:
            kept = _mean(float(sum(r["kept_tokens"])) for r in recs if r.get("kept_tokens"))
        rows.append(SummaryRow(pipeline, budget, len(recs), kept, fam_acc, accuracy, retention))
    return Summary(tuple(fams), rows)


def plot_accuracy(summary: Summary, path: Path, *, title: str | None = None) -> Path:
    """Plot overall accuracy vs visual tokens kept, one line per pipeline, to a PNG.

    The unpruned model is a dashed horizontal line. Uses matplotlib's Agg canvas directly (no
    display, no global backend change).

    Args:
        summary: The summary to plot.
        path: Output PNG path.
        title: Figure title.

    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lines: dict[str, list[tuple[float, float]]] = {}
    baseline: SummaryRow | None = None
    for row in summary.rows:
        if row.pipeline == BASELINE and row.budget == FULL_BUDGET:
            baseline = row
        elif row.kept_tokens is not None:
            lines.setdefault(row.pipeline, []).append((row.kept_tokens, 100 * row.accuracy))
    xs_all: list[float] = []
    for name, points in lines.items():
        points.sort()
        xs, ys = zip(*points, strict=True)
        xs_all.extend(xs)
        ax.plot(xs, ys, marker="o", label=name)
    if baseline is not None:
        label = f"unpruned ({100 * baseline.accuracy:.1f}%)"
        ax.axhline(100 * baseline.accuracy, color="black", linestyle="--", linewidth=1, label=label)
        if baseline.kept_tokens is not None:
            xs_all.append(baseline.kept_tokens)
            ax.plot([baseline.kept_tokens], [100 * baseline.accuracy], "k*", markersize=9)
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) > 4:
        ax.set_xscale("log")
        ticks = sorted(set(xs_all))
        ax.set_xticks(ticks, [_fmt_tokens(t) for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel("visual tokens kept per sample")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def write_report(summary: Summary, out_dir: Path, *, title: str | None = None) -> dict[str, Path]:
    """Write ``summary.md``, ``summary.csv`` and ``accuracy.png`` into ``out_dir``.

    Returns:
        The written paths by kind (``markdown``, ``csv``, ``plot``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "summary.md"
    header = f"# {title}\n\n" if title else ""
    note = (
        "\nAccuracy per family and overall in %; retention = accuracy / unpruned accuracy on the "
        "same samples; visual tokens = mean tokens per sample that reached the language model.\n"
    )
    md.write_text(header + summary.to_markdown() + note, encoding="utf-8")
    csv_path = out_dir / "summary.csv"
    csv_path.write_text(summary.to_csv(), encoding="utf-8")
    plot = plot_accuracy(summary, out_dir / "accuracy.png", title=title)
    return {"markdown": md, "csv": csv_path, "plot": plot}
