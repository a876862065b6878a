"""Summaries of evaluation results: accuracy per family, retention vs unpruned, table and plot.

Retention is the accuracy of a (pipeline, budget) divided by the unpruned model's accuracy on
the *same samples*, in percent: 100% means pruning lost nothing. Overall accuracy comes with its
95% Wilson score interval.

Selection metrics, for tasks whose samples know where the answer is
(:attr:`tokenprune.eval.tasks.Sample.relevance`): **recall** is the mean, over samples with at
least one relevant token, of the share of relevant tokens the pipeline kept; **hit rate** is the
share of those samples that kept at least one. What "kept" means for merging methods is defined
in :meth:`tokenprune.eval.runner.PruneRecorder.kept_per_sample`. **Well-formed** is the share of
answers that are an answer the family can have, right or wrong (tasks with a closed answer set).

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
    >>> [round(x, 3) for x in s.rows[1].accuracy_ci]
    [0.095, 0.905]
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BASELINE",
    "wilson_interval",
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
        accuracy_ci: 95% Wilson score interval of ``accuracy``.
        recall: Mean share of relevant tokens kept (samples with relevant tokens); ``None``
            when unknown (the baseline, tasks without relevance).
        hit_rate: Share of samples with relevant tokens that kept at least one; ``None`` when
            unknown.
        well_formed: Share of answers the family can have; ``None`` when the task cannot tell.
    """

    pipeline: str
    budget: str
    samples: int
    kept_tokens: float | None
    family_accuracy: Mapping[str, float | None]
    accuracy: float
    retention: float | None
    accuracy_ci: tuple[float, float] = (0.0, 1.0)
    recall: float | None = None
    hit_rate: float | None = None
    well_formed: float | None = None


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
            "95% CI",
            "retention",
            "recall",
            "hit rate",
            "well-formed",
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
                    f"{_pct(r.accuracy_ci[0])}-{_pct(r.accuracy_ci[1])}",
                    _pct(r.retention),
                    _pct(r.recall),
                    _pct(r.hit_rate),
                    _pct(r.well_formed),
                    str(r.samples),
                ]
            )
        return out

    def to_markdown(self) -> str:
        """The table as Markdown (accuracy and retention in percent)."""
        return _markdown(self.headers(), self.table())

    def to_csv(self) -> str:
        """The table as CSV (fractions, not percentages; empty cells for unknown values).

        The interval is two columns, ``ci_low`` and ``ci_high``.
        """
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        headers = self.headers()
        at = headers.index("95% CI")
        writer.writerow([*headers[:at], "ci_low", "ci_high", *headers[at + 1 :]])
        for r in self.rows:
            writer.writerow(
                [
                    r.pipeline,
                    r.budget,
                    _num(r.kept_tokens),
                    *(_num(r.family_accuracy.get(f)) for f in self.families),
                    _num(r.accuracy),
                    _num(r.accuracy_ci[0]),
                    _num(r.accuracy_ci[1]),
                    _num(r.retention),
                    _num(r.recall),
                    _num(r.hit_rate),
                    _num(r.well_formed),
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


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Return the Wilson score interval of a proportion (95% for the default ``z``).

    Args:
        successes: Number of successes.
        n: Number of trials (``(0, 1)`` when zero).
        z: Standard-normal quantile of the interval.

    Examples:
        >>> [round(x, 4) for x in wilson_interval(8, 10)]
        [0.4902, 0.9433]
    """
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _selection(recs: Sequence[Mapping[str, Any]]) -> tuple[float | None, float | None]:
    """``(recall, hit rate)`` over the records with at least one relevant token."""
    known = [r for r in recs if r.get("relevant_total") and r.get("relevant_kept") is not None]
    recall = _mean(r["relevant_kept"] / r["relevant_total"] for r in known)
    hit = _mean(float(r["relevant_kept"] > 0) for r in known)
    return recall, hit


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
        correct = sum(bool(r["correct"]) for r in recs)
        recall, hit = _selection(recs)
        rows.append(
            SummaryRow(
                pipeline,
                budget,
                len(recs),
                kept,
                fam_acc,
                accuracy,
                retention,
                accuracy_ci=wilson_interval(correct, len(recs)),
                recall=recall,
                hit_rate=hit,
                well_formed=_mean(
                    float(r["well_formed"]) for r in recs if r.get("well_formed") is not None
                ),
            )
        )
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
    summary has more than one family), and a last panel of relevant-token recall when the rows
    have it, all on the same axes (percent). The unpruned model is a dashed
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
    if any(r.recall is not None for r in summary.rows):
        panels.append(_RECALL_PANEL)
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
        ax.set_title(_TITLES.get(family) or str(family), fontsize="medium")
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
            ax.set_ylabel("accuracy / recall (%)" if _RECALL_PANEL in panels else "accuracy (%)")
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


_RECALL_PANEL = "\0recall"
"""Panel key of the relevant-token recall (no family can have this name)."""
_TITLES: dict[str | None, str] = {None: "overall", _RECALL_PANEL: "relevant-token recall"}


def _value(row: SummaryRow, family: str | None) -> float | None:
    """Percent of ``row``: overall accuracy (``None``), one family's, or the recall panel's."""
    if family == _RECALL_PANEL:
        value = row.recall
    else:
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
        "\nAccuracy per family and overall in %, with the 95% Wilson interval of overall; "
        "retention = accuracy / unpruned accuracy on the same samples; visual tokens = mean "
        "tokens per sample that reached the language model; recall = mean share of the "
        "question-relevant tokens kept, hit rate = share of samples keeping at least one "
        "(tasks that know where the answer is); well-formed = share of answers the family can "
        "have, right or wrong.\n"
    )
    md.write_text(header + summary.to_markdown() + note, encoding="utf-8")
    csv_path = out_dir / "summary.csv"
    csv_path.write_text(summary.to_csv(), encoding="utf-8")
    plot = plot_accuracy(summary, out_dir / "accuracy.png", title=title)
    return {"markdown": md, "csv": csv_path, "plot": plot}
