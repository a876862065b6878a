"""Summaries and the accuracy plot (tokenprune.eval.report)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tokenprune.eval.report import _style, plot_accuracy, summarize


def _records(pipelines: int, families: tuple[str, ...]) -> tuple[list[dict[str, Any]], list[Any]]:
    recs: list[dict[str, Any]] = []
    grid = [("unpruned", "full")]
    for i, fam in enumerate(families):
        recs.append(
            {"pipeline": "unpruned", "budget": "full", "sample_id": f"s{i}", "family": fam,
             "correct": True, "kept_tokens": None, "total_tokens": None}
        )  # fmt: skip
    for p in range(pipelines):
        for budget, kept in (("0.5", 8), ("0.25", 4)):
            grid.append((f"p{p}", budget))
            for i, fam in enumerate(families):
                recs.append(
                    {"pipeline": f"p{p}", "budget": budget, "sample_id": f"s{i}", "family": fam,
                     "correct": (i + p) % 2 == 0, "kept_tokens": [kept], "total_tokens": [16]}
                )  # fmt: skip
    return recs, grid


def test_styles_stay_distinct_past_the_colour_cycle() -> None:
    styles = [tuple(sorted(_style(i).items())) for i in range(40)]
    assert len(set(styles)) == 40
    # the eleventh pipeline shares the first one's colour but not its line style
    assert _style(10)["color"] == _style(0)["color"]
    assert _style(10)["linestyle"] != _style(0)["linestyle"]


@pytest.mark.parametrize(
    ("families", "size"),
    [
        (("x",), (600, 360)),  # one family: the overall panel only
        (("a", "b"), (1320, 360)),  # overall + 2 family panels in one row
        (("a", "b", "c", "d", "e"), (1320, 660)),  # overall + 5: two rows of three
    ],
)
def test_plot_has_one_panel_per_family_plus_overall(
    tmp_path: Path, families: tuple[str, ...], size: tuple[int, int]
) -> None:
    recs, grid = _records(12, families)
    summary = summarize(recs, grid, families=families)
    path = plot_accuracy(summary, tmp_path / "sub" / "acc.png", title="t")
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == size


def test_plot_without_baseline_or_token_counts(tmp_path: Path) -> None:
    recs, grid = _records(2, ("a", "b"))
    no_base = [r for r in recs if r["pipeline"] != "unpruned"]
    summary = summarize(no_base, grid[1:], families=("a", "b"))
    assert all(r.retention is None for r in summary.rows)
    path = plot_accuracy(summary, tmp_path / "acc.png")
    assert path.stat().st_size > 0
