"""Overlay drawing (pure functions) and the ``viz`` command on ``tiny_llava``."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tokenprune.viz.overlay import (
    GAP,
    KEPT_COLOUR,
    TITLE_HEIGHT,
    Panel,
    cell_index_map,
    keep_mask,
    overlay_selection,
    panel_grid_size,
    render_panels,
    save_panels,
)

EVAL_TESTS = Path(__file__).parents[1] / "eval"


def _image(h: int = 32, w: int = 32) -> np.ndarray:
    return np.full((h, w, 3), 200, np.uint8)


def test_keep_mask_and_cells() -> None:
    mask = keep_mask((2, 3), [1, 5])
    assert mask.tolist() == [[False, True, False], [False, False, True]]
    with pytest.raises(ValueError, match="outside"):
        keep_mask((2, 3), [6])
    cells = cell_index_map((2, 3), (4, 6))
    assert cells[0].tolist() == [0, 0, 1, 1, 2, 2]
    assert cells[3].tolist() == [3, 3, 4, 4, 5, 5]
    # Uneven image sizes still cover every cell.
    assert set(cell_index_map((4, 4), (30, 33)).ravel().tolist()) == set(range(16))


def test_overlay_dims_dropped_and_outlines_kept() -> None:
    out = overlay_selection(_image(), (4, 4), [0], scale=2, dim=0.5)
    assert out.shape == (64, 64, 3)
    assert out.dtype == np.uint8
    assert out[0, 0].tolist() == list(KEPT_COLOUR)  # outline of the kept patch
    assert out[8, 8].tolist() == [200, 200, 200]  # inside the kept patch (16x16 at scale 2)
    assert out[40, 40].tolist() == [100, 100, 100]  # dropped patch, dimmed


def test_overlay_with_merge_assignment() -> None:
    assignment = np.zeros(16, int)
    assignment[8:] = 15
    out = overlay_selection(_image(), (4, 4), [0, 15], assignment=assignment)
    left, right = out[12, 4], out[28, 4]  # dropped patches of cluster 0 and of cluster 15
    assert left.tolist() != right.tolist()
    with pytest.raises(ValueError, match="not kept"):
        overlay_selection(_image(), (4, 4), [0], assignment=np.full(16, 3))
    with pytest.raises(ValueError, match="entries"):
        overlay_selection(_image(), (4, 4), [0], assignment=[0, 0])


def test_save_panels_writes_png_of_expected_size(tmp_path: Path) -> None:
    panels = [Panel("image"), Panel("a", [0, 1]), Panel("b", [3], np.full(16, 3))]
    path = save_panels(tmp_path / "sub" / "grid.png", _image(32, 48), (4, 4), panels, scale=3)
    width, height = panel_grid_size((32, 48), 3, scale=3)
    assert (width, height) == (3 * 48 * 3 + 2 * GAP, 32 * 3 + TITLE_HEIGHT)
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == (width, height)
    assert render_panels(_image(), (4, 4), [Panel("x")], scale=1).size == (32, 32 + TITLE_HEIGHT)
    with pytest.raises(ValueError, match="at least one panel"):
        render_panels(_image(), (4, 4), [])


@pytest.fixture(scope="module")
def tiny() -> object:
    if str(EVAL_TESTS) not in sys.path:
        sys.path.insert(0, str(EVAL_TESTS))
    return importlib.import_module("_tiny")


def test_capture_with_an_observer_plugin(tiny: object) -> None:
    from tokenprune.eval.runner import Budget, PipelineSpec, capture_pruning

    model = tiny.tiny_model()  # type: ignore[attr-defined]
    sample = tiny.tiny_task().samples("test", 0, 1)[0]  # type: ignore[attr-defined]
    cfg = {"scorer": {"name": "cls_attention"}, "selector": {"name": "topk"}, "keep": 4}
    before = dict(model.module.named_parameters())
    captured = capture_pruning(
        model, sample, [PipelineSpec("unpruned"), PipelineSpec("cls", cfg)], Budget.parse("0.5"),
        with_assignment=True,
    )  # fmt: skip
    (rec,) = captured.values()
    assert rec.keep_idx.shape == (1, 8)
    assert rec.num_tokens == 16
    assert rec.grid == (4, 4)
    assert rec.assignment is not None
    assert rec.assignment.shape == (1, 16)
    assert set(rec.assignment[0].tolist()) <= set(rec.keep_idx[0].tolist())
    assert rec.assignment[0][rec.keep_idx[0]].tolist() == rec.keep_idx[0].tolist()
    assert not model.module._forward_pre_hooks  # the handle was removed
    assert dict(model.module.named_parameters()).keys() == before.keys()


def test_cli_viz(tiny: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tokenprune.cli import main

    a, b = tmp_path / "rnd.yaml", tmp_path / "cls.toml"
    a.write_text("scorer: {name: random}\nselector: {name: topk}\nkeep: 4\n")
    b.write_text('keep = 4\n[scorer]\nname = "cls_attention"\n[selector]\nname = "topk"\n')
    out = tmp_path / "viz.png"
    argv = [
        "viz", "--model", "_tiny:tiny_model", "--task", "_tiny:tiny_task", "--sample",
        "test-bright-1", "--pipeline", str(a), "--pipeline", str(b), "--merge", "--scale", "2",
        "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    assert "test-bright-1" in capsys.readouterr().out
    with Image.open(out) as png:
        assert png.size == panel_grid_size((32, 32), 3, scale=2)
    assert main([*argv[:5], "--sample", "99", *argv[7:]]) == 2
    assert "out of range" in capsys.readouterr().err
