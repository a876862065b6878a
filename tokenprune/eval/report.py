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


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
_LINESTYLES = ("-", "--", ":", "-.")


def _style(index: int) -> dict[str, Any]:
    """Colour, marker and line style of the ``index``-th pipeline: distinct for 40 pipelines."""
    return {
        "color": f"C{index % 10}",
        "marker": _MARKERS[index % len(_MARKERS)],
        "linestyle": _LINESTYLES[(index // 10) % len(_LINESTYLES)],
    }


def plot_accuracy(summary: Summary, path: Path, *, title: str | None = None) -> Path:
    """Plot accuracy vs visual tokens kept, one line per pipeline, to a PNG.

    The first panel is overall accuracy; one small panel per task family follows (when the
    summary has more than one family), all on the same axes. The unpruned model is a dashed
    black line with a star at its token count. Pipelines differ in colour, marker and, past ten,
    line style, and share one legend. Uses matplotlib's Agg canvas directly (no display, no
    global backend change).

    Args:
        summary: The summary to plot.
        path: Output PNG path.
        title: Figure title.

    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels: list[str | None] = [None]
    if len(summary.families) > 1:
        panels.extend(summary.families)
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(3.6 * cols + 2.4, 3.0 * rows + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True).ravel()
    baseline = next(
        (r for r in summary.rows if r.pipeline == BASELINE and r.budget == FULL_BUDGET), None
    )
    # (tokens, row) per pipeline in table order, sorted by tokens: the points of its line.
    lines: dict[str, list[tuple[float, SummaryRow]]] = {}
    for r in summary.rows:
        if r is not baseline and r.kept_tokens:
            lines.setdefault(r.pipeline, []).append((r.kept_tokens, r))
    for points in lines.values():
        points.sort(key=lambda point: point[0])
    xs_all = sorted({r.kept_tokens for r in summary.rows if r.kept_tokens})
    for ax, family in zip(axes, panels, strict=False):
        for i, (name, points) in enumerate(lines.items()):
            xy = [(x, y) for x, r in points if (y := _value(r, family)) is not None]
            if xy:
                xs, ys = zip(*xy, strict=True)
                ax.plot(xs, ys, label=name, markersize=4, linewidth=1.2, **_style(i))
        if baseline is not None and (base := _value(baseline, family)) is not None:
            ax.axhline(base, color="black", linestyle="--", linewidth=1, label="unpruned")
            if baseline.kept_tokens is not None:
                ax.plot([baseline.kept_tokens], [base], "k*", markersize=8)
        ax.set_title("overall" if family is None else family, fontsize="medium")
        ax.set_ylim(-3, 103)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) > 4:
        for ax in axes[: len(panels)]:
            ax.set_xscale("log")
            ax.set_xticks(xs_all, [_fmt_tokens(t) for t in xs_all])
            ax.minorticks_off()
    for i, ax in enumerate(axes[: len(panels)]):
        if i + cols >= len(panels):  # no visible panel below: label its x axis
            ax.set_xlabel("visual tokens kept per sample")
            ax.tick_params(labelbottom=True)
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel("accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    if baseline is not None:
        overall = f"unpruned ({100 * baseline.accuracy:.1f}% overall)"
        labels = [overall if lb == BASELINE else lb for lb in labels]
    fig.legend(handles, labels, loc="center right", fontsize="small", frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 2.4 / fig.get_figwidth(), 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _value(row: SummaryRow, family: str | None) -> float | None:
    """Accuracy of ``row`` in percent: overall (``family=None``) or of one family."""
    value = row.accuracy if family is None else row.family_accuracy.get(family)
    return None if value is None else 100 * value


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
