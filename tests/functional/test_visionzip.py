"""VisionZip functional core against the naive per-sample reference."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tokenprune.errors import BudgetError, ShapeError
from tokenprune.functional.visionzip import (
    visionzip_counts,
    visionzip_keep_indices,
    visionzip_merge,
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
CASES = [(7, 3, 1), (16, 8, 3), (16, 5, 0), (30, 12, 4), (30, 30, 10), (9, 1, 1)]


def _scores(b: int, n: int, seed: int, ties: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if ties:
        return torch.randint(0, 3, (b, n), generator=g).double()
    return torch.rand(b, n, generator=g, dtype=torch.float64)


def test_counts_reproduce_the_paper_settings() -> None:
    f = 54 / 64
    assert [visionzip_counts(k, f) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert visionzip_counts(1, f) == (1, 0)
    assert visionzip_counts(5, 0.0) == (0, 5)
    with pytest.raises(BudgetError):
        visionzip_counts(0, f)
    with pytest.raises(BudgetError):
        visionzip_counts(4, 1.5)


@pytest.mark.parametrize(("n", "k", "c"), CASES)
@pytest.mark.parametrize("ties", [False, True])
def test_keep_indices_match_the_reference(n: int, k: int, c: int, ties: bool) -> None:
    scores = _scores(3, n, seed=n * 31 + k, ties=ties)
    idx, dominant = visionzip_keep_indices(scores, k, c)
    assert idx.shape == dominant.shape == (3, k)
    assert bool((idx[:, 1:] > idx[:, :-1]).all())
    for row in range(3):
        keep, dom = ref.visionzip_select(scores[row], k, c)
        assert idx[row].tolist() == keep
        assert {int(i) for i, d in zip(idx[row], dominant[row], strict=True) if d} == dom
    assert (dominant.sum(dim=1) == k - c).all()


@pytest.mark.parametrize(("n", "k", "c"), CASES)
@pytest.mark.parametrize("mode", ["add", "mean"])
def test_merge_matches_the_reference(n: int, k: int, c: int, mode: str) -> None:
    g = torch.Generator().manual_seed(n + 7 * k)
    x = torch.randn(3, n, 5, generator=g, dtype=torch.float64)
    metric = torch.randn(3, n, 4, generator=g, dtype=torch.float64)
    idx, dominant = visionzip_keep_indices(_scores(3, n, seed=k), k, c)
    merged, weights = visionzip_merge(x, metric, idx, dominant, mode=mode)
    for row in range(3):
        keep = idx[row].tolist()
        dom = {int(i) for i, d in zip(idx[row], dominant[row], strict=True) if d}
        want, want_w = ref.visionzip_merge(x[row], metric[row], keep, dom, mode)
        torch.testing.assert_close(merged[row], want, atol=1e-6, rtol=0)
        torch.testing.assert_close(weights[row], want_w, atol=1e-6, rtol=0)
    if c:  # every token is accounted for once
        torch.testing.assert_close(weights.sum(dim=1), torch.full((3,), float(n), dtype=x.dtype))


def test_merge_without_dominant_tokens_folds_every_token_into_a_kept_one() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 3, generator=g, dtype=torch.float64)
    idx = torch.tensor([[0, 5, 9], [1, 2, 11]])
    dominant = torch.zeros(2, 3, dtype=torch.bool)
    merged, weights = visionzip_merge(x, x, idx, dominant, mode="mean")
    assert weights.sum().item() == 24
    for row in range(2):
        want, _ = ref.visionzip_merge(x[row], x[row], idx[row].tolist(), set(), "mean")
        torch.testing.assert_close(merged[row], want, atol=1e-6, rtol=0)


def test_dominant_tokens_are_untouched_and_float32_dtype_is_kept() -> None:
    x = torch.randn(1, 10, 4)
    idx, dominant = visionzip_keep_indices(torch.rand(1, 10), 4, 1)
    merged, _ = visionzip_merge(x, x, idx, dominant)
    assert merged.dtype == torch.float32
    kept = x[0, idx[0]]
    assert torch.equal(merged[0][dominant[0]], kept[dominant[0]])


def test_errors() -> None:
    with pytest.raises(BudgetError):
        visionzip_keep_indices(torch.rand(1, 4), 5, 1)
    with pytest.raises(BudgetError):
        visionzip_keep_indices(torch.rand(1, 4), 2, 3)
    with pytest.raises(ShapeError):
        visionzip_keep_indices(torch.tensor([[0.1, float("nan")]]), 1, 0)
    x = torch.randn(1, 4, 2)
    with pytest.raises(ValueError, match="mode"):
        visionzip_merge(x, x, torch.tensor([[0]]), torch.tensor([[False]]), mode="sum")
    with pytest.raises(ShapeError):
        visionzip_merge(x, x[:, :3], torch.tensor([[0]]), torch.tensor([[False]]))
    with pytest.raises(ShapeError):
        visionzip_merge(x, x, torch.tensor([[4]]), torch.tensor([[False]]))
