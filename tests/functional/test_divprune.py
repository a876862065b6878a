"""DivPrune functional core against the naive per-sample reference."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tokenprune.errors import BudgetError, ShapeError
from tokenprune.functional.divprune import divprune_keep_indices


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


@pytest.mark.parametrize(("n", "k"), [(1, 1), (2, 1), (7, 3), (16, 8), (25, 25), (40, 9)])
@pytest.mark.parametrize("seed", range(2))
def test_matches_the_reference(n: int, k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(100 * seed + n)
    f = torch.randn(3, n, 6, generator=g, dtype=torch.float64)
    idx = divprune_keep_indices(f, k)
    assert idx.shape == (3, k)
    assert idx.dtype == torch.long
    assert bool((idx[:, 1:] > idx[:, :-1]).all())
    for row in range(3):
        assert idx[row].tolist() == ref.divprune_select(f[row], k)


def test_repeated_features_still_give_unique_tokens() -> None:
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(1, 4, 1)  # 8 tokens, two directions
    idx = divprune_keep_indices(f, 5)
    assert idx[0].unique().numel() == 5
    assert idx[0].tolist() == ref.divprune_select(f[0], 5)


def test_first_pick_is_the_most_isolated_token() -> None:
    f = torch.tensor([[[1.0, 0.0], [0.99, 0.1], [1.0, 0.05], [-1.0, 0.2]]])
    assert divprune_keep_indices(f, 1).tolist() == [[3]]


def test_errors() -> None:
    with pytest.raises(ShapeError):
        divprune_keep_indices(torch.randn(4, 3), 2)
    with pytest.raises(BudgetError):
        divprune_keep_indices(torch.randn(1, 4, 3), 5)
