"""Spatial average pooling against the naive reference and torch's avg_pool2d."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tokenprune.errors import BudgetError, ShapeError
from tokenprune.functional.assign import cluster_mean
from tokenprune.functional.pool import pool_shape, pool_windows, spatial_nearest_assignment


def _reference() -> ModuleType:
    name = "_tokenprune_tests_reference_methods"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).with_name("_reference_methods.py")
        )
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


ref = _reference()

GRIDS = [((24, 24), 64), ((24, 24), 144), ((24, 24), 32), ((5, 7), 6), ((4, 4), 16), ((1, 7), 3)]


@pytest.mark.parametrize(("grid", "k"), GRIDS)
def test_shape_and_windows_match_the_reference(grid: tuple[int, int], k: int) -> None:
    h, w = grid
    assert pool_shape(grid, k) == ref.pool_shape(h, w, k)
    keep_idx, assignment = pool_windows(grid, k)
    want_keep, want_assignment = ref.pool_windows(h, w, k)
    assert keep_idx.tolist() == want_keep
    assert assignment.tolist() == want_assignment
    assert bool((keep_idx[1:] > keep_idx[:-1]).all())
    assert torch.equal(assignment[keep_idx], torch.arange(k))  # a representative is inside


def test_square_budgets_are_plain_average_pooling() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24 * 24, 3, generator=g, dtype=torch.float64)
    _, assignment = pool_windows((24, 24), 64)
    merged, sizes = cluster_mean(x, assignment.expand(2, -1), 64)
    image = x.transpose(1, 2).reshape(2, 3, 24, 24)
    want = torch.nn.functional.avg_pool2d(image, 3).flatten(2).transpose(1, 2)
    torch.testing.assert_close(merged, want, atol=1e-6, rtol=0)
    assert sizes.sum().item() == 2 * 576


def test_paper_shapes() -> None:
    assert pool_shape((24, 24), 64) == (8, 8)
    assert pool_shape((24, 24), 576) == (24, 24)
    assert pool_shape((24, 24), 1) == (1, 1)
    assert pool_shape((2, 8), 4) == (1, 4)


def test_impossible_budgets_raise() -> None:
    with pytest.raises(BudgetError, match="cannot pool a 4x4 grid"):
        pool_shape((4, 4), 7)
    with pytest.raises(BudgetError):
        pool_shape((4, 4), 17)


@pytest.mark.parametrize("seed", range(3))
def test_spatial_nearest_matches_the_reference(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    h, w, k = 5, 6, 7
    keep = torch.stack([torch.randperm(h * w, generator=g)[:k].sort().values for _ in range(3)])
    got = spatial_nearest_assignment((h, w), keep)
    for row in range(3):
        assert got[row].tolist() == ref.spatial_nearest(h, w, keep[row].tolist())
    with pytest.raises(ShapeError):
        spatial_nearest_assignment((h, w), torch.tensor([[0, h * w]]))
