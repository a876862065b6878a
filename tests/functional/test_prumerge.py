"""PruMerge / PruMerge+ functional core against the naive per-sample reference."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tokenprune.errors import BudgetError, ShapeError
from tokenprune.functional.prumerge import (
    iqr_outliers,
    prumerge_adaptive_count,
    prumerge_keep_indices,
    prumerge_merge,
)


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
CASES = [(12, 1), (12, 4), (25, 6), (40, 10), (40, 40)]


def _heavy_scores(b: int, n: int, seed: int) -> torch.Tensor:
    """Softmax-like attention with a few outliers, as [CLS] attention looks."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, n, generator=g, dtype=torch.float64)
    spikes = torch.rand(b, n, generator=g, dtype=torch.float64) < 0.1
    return (logits + 4.0 * spikes).softmax(dim=-1)


@pytest.mark.parametrize("seed", range(4))
def test_iqr_outliers_match_numpy_per_image(seed: int) -> None:
    scores = _heavy_scores(3, 30, seed)
    mask = iqr_outliers(scores)
    for row in range(3):
        assert {i for i, m in enumerate(mask[row].tolist()) if m} == ref.iqr_outliers(scores[row])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("plus", [False, True])
def test_adaptive_count_matches_the_reference(seed: int, plus: bool) -> None:
    scores = _heavy_scores(3, 36, seed)
    count = prumerge_adaptive_count(scores, plus=plus)
    assert count.dtype == torch.long
    assert count.tolist() == [ref.prumerge_adaptive(scores[r], plus) for r in range(3)]


def test_adaptive_count_without_outliers() -> None:
    flat = torch.ones(1, 24)
    assert prumerge_adaptive_count(flat).tolist() == [0]
    assert prumerge_adaptive_count(flat, plus=True).tolist() == [
        ref.prumerge_adaptive(flat[0], True)
    ]


@pytest.mark.parametrize(("n", "k"), CASES)
@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_keep_indices_match_the_reference(n: int, k: int, plus: bool, ties: bool) -> None:
    scores = _heavy_scores(3, n, seed=n + k)
    if ties:
        scores = (scores * 20).round()
    idx = prumerge_keep_indices(scores, k, plus=plus)
    assert idx.shape == (3, k)
    assert bool((idx[:, 1:] > idx[:, :-1]).all())
    for row in range(3):
        assert idx[row].tolist() == ref.prumerge_select(scores[row], k, plus)


def test_plus_keeps_the_outliers_first_and_truncates_them_to_the_budget() -> None:
    scores = torch.ones(1, 20, dtype=torch.float64)
    scores[0, [3, 11, 17]] = torch.tensor([5.0, 9.0, 7.0], dtype=torch.float64)
    assert prumerge_keep_indices(scores, 2, plus=True).tolist() == [[11, 17]]
    idx = prumerge_keep_indices(scores, 6, plus=True)[0].tolist()
    assert {3, 11, 17} <= set(idx)
    assert idx == ref.prumerge_select(scores[0], 6, True)


@pytest.mark.parametrize(("n", "k"), CASES)
@pytest.mark.parametrize("neighbours", [1, 5, 32])
def test_merge_matches_the_reference(n: int, k: int, neighbours: int) -> None:
    g = torch.Generator().manual_seed(3 * n + k)
    x = torch.randn(2, n, 5, generator=g, dtype=torch.float64)
    keys = torch.randn(2, n, 6, generator=g, dtype=torch.float64)
    attention = _heavy_scores(2, n, seed=k)
    idx = prumerge_keep_indices(attention, k)
    merged, weights = prumerge_merge(x, keys, attention, idx, neighbours=neighbours)
    assert merged.shape == (2, k, 5)
    for row in range(2):
        want, want_w = ref.prumerge_merge(
            x[row], keys[row], attention[row], idx[row].tolist(), neighbours
        )
        torch.testing.assert_close(merged[row], want, atol=1e-6, rtol=0)
        torch.testing.assert_close(weights[row], want_w, atol=1e-6, rtol=0)


def test_merge_on_a_single_token_is_the_identity() -> None:
    x = torch.randn(2, 1, 3)
    merged, weights = prumerge_merge(x, x, torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long))
    assert torch.equal(merged, x)
    assert weights.tolist() == [[1.0], [1.0]]


def test_errors() -> None:
    with pytest.raises(BudgetError):
        prumerge_keep_indices(torch.rand(1, 4), 0)
    with pytest.raises(ShapeError):
        iqr_outliers(torch.rand(4))
    with pytest.raises(ShapeError):
        prumerge_keep_indices(torch.tensor([[0.5, float("nan")]]), 1)
    x = torch.randn(1, 4, 2)
    idx = torch.tensor([[0, 2]])
    with pytest.raises(ValueError, match="neighbours"):
        prumerge_merge(x, x, torch.rand(1, 4), idx, neighbours=0)
    with pytest.raises(ShapeError):
        prumerge_merge(x, x, torch.rand(1, 3), idx)
    with pytest.raises(ShapeError):
        prumerge_merge(x, x, torch.rand(1, 4), torch.tensor([[2, 0]]))
