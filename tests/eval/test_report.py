"""Summaries and the accuracy plot (tokenprune.eval.report)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tokenprune.eval.report import _style, plot_accuracy, summarize, wilson_interval


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


# -- confidence interval, recall, hit rate, well-formed -------------------------------------------


@pytest.mark.parametrize(
    ("successes", "n", "expected"),
    [
        (0, 10, (0.0, 0.2775)),
        (10, 10, (0.7225, 1.0)),
        (5, 10, (0.2366, 0.7634)),
        (8, 10, (0.4902, 0.9433)),
        (0, 0, (0.0, 1.0)),
    ],
)
def test_wilson_interval(successes: int, n: int, expected: tuple[float, float]) -> None:
    low, high = wilson_interval(successes, n)
    assert (low, high) == pytest.approx(expected, abs=1e-4)
    assert 0.0 <= low <= high <= 1.0


def test_wilson_interval_narrows_with_more_trials() -> None:
    small, large = wilson_interval(5, 10), wilson_interval(500, 1000)
    assert large[1] - large[0] < small[1] - small[0]
    assert large[0] < 0.5 < large[1]
    assert wilson_interval(1, 2, z=0.0) == pytest.approx((0.5, 0.5))


def _rec(pipeline: str, budget: str, sid: str, correct: bool, **extra: Any) -> dict[str, Any]:
    kept = None if pipeline == "unpruned" else [4]
    total = None if kept is None else [16]
    return {"pipeline": pipeline, "budget": budget, "sample_id": sid, "family": "f",
            "correct": correct, "kept_tokens": kept, "total_tokens": total, **extra}  # fmt: skip


def _selection_records() -> list[dict[str, Any]]:
    return [
        _rec("unpruned", "full", "a", True, well_formed=True),
        _rec("unpruned", "full", "b", True, well_formed=False),
        _rec("unpruned", "full", "c", True, well_formed=None),
        _rec("unpruned", "full", "d", True, well_formed=True),
        _rec("p", "0.25", "a", True, relevant_total=4, relevant_kept=2, well_formed=True),
        _rec("p", "0.25", "b", False, relevant_total=2, relevant_kept=0, well_formed=True),
        # no relevant token: left out of recall and hit rate
        _rec("p", "0.25", "c", False, relevant_total=0, relevant_kept=0, well_formed=False),
        # unknown relevance: left out too
        _rec("p", "0.25", "d", True, relevant_total=None, relevant_kept=None, well_formed=True),
        _rec("q", "0.25", "a", True),  # records without the new fields (older results)
    ]


def test_summary_recall_hit_rate_and_well_formed() -> None:
    grid = [("unpruned", "full"), ("p", "0.25"), ("q", "0.25")]
    base, p, q = summarize(_selection_records(), grid).rows
    assert p.recall == pytest.approx((2 / 4 + 0 / 2) / 2)
    assert p.hit_rate == pytest.approx(0.5)
    assert p.well_formed == pytest.approx(3 / 4)
    assert p.accuracy_ci == pytest.approx(wilson_interval(2, 4))
    assert (base.recall, base.hit_rate) == (None, None)
    assert base.well_formed == pytest.approx(2 / 3)  # the unknown answer does not count
    assert base.accuracy_ci == pytest.approx(wilson_interval(4, 4))
    assert (q.recall, q.hit_rate, q.well_formed) == (None, None, None)
    only = summarize([_rec("p", "1", "a", True, relevant_total=4, relevant_kept=2)], [("p", "1")])
    assert (only.rows[0].recall, only.rows[0].hit_rate) == (0.5, 1.0)


def test_selection_columns_in_markdown_and_csv() -> None:
    grid = [("unpruned", "full"), ("p", "0.25"), ("q", "0.25")]
    summary = summarize(_selection_records(), grid)
    rows = list(csv.DictReader(io.StringIO(summary.to_csv())))
    assert list(rows[0]) == [
        "pipeline", "budget", "visual tokens", "f", "overall", "ci_low", "ci_high", "retention",
        "recall", "hit rate", "well-formed", "samples",
    ]  # fmt: skip
    p = rows[1]
    assert (p["pipeline"], p["recall"], p["hit rate"], p["well-formed"]) == (
        "p",
        "0.25",
        "0.5",
        "0.75",
    )
    assert float(p["ci_low"]) == pytest.approx(wilson_interval(2, 4)[0], abs=1e-5)
    assert float(p["ci_high"]) == pytest.approx(wilson_interval(2, 4)[1], abs=1e-5)
    assert (rows[0]["recall"], rows[0]["hit rate"]) == ("", "")
    assert (rows[2]["recall"], rows[2]["well-formed"]) == ("", "")

    lines = summary.to_markdown().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = {
        line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
        for line in lines[2:]
    }
    p_cells = dict(zip(header, cells["p"], strict=True))
    low, high = wilson_interval(2, 4)
    assert p_cells["95% CI"] == f"{100 * low:.1f}-{100 * high:.1f}"
    assert (p_cells["recall"], p_cells["hit rate"], p_cells["well-formed"]) == (
        "25.0",
        "50.0",
        "75.0",
    )
    base_cells = dict(zip(header, cells["unpruned"], strict=True))
    assert (base_cells["recall"], base_cells["hit rate"]) == ("-", "-")
    assert base_cells["95% CI"] == f"{100 * wilson_interval(4, 4)[0]:.1f}-100.0"


def test_plot_adds_a_recall_panel_when_rows_have_recall(tmp_path: Path) -> None:
    grid = [("unpruned", "full"), ("p", "0.25")]
    with_recall = summarize(_selection_records(), grid, families=["f"])
    without = summarize([r for r in _selection_records() if r["sample_id"] == "d"], grid)
    assert without.rows[1].recall is None
    with Image.open(plot_accuracy(with_recall, tmp_path / "r.png")) as png:
        assert png.size == (960, 360)  # overall + recall
    with Image.open(plot_accuracy(without, tmp_path / "n.png")) as png:
        assert png.size == (600, 360)  # overall only
