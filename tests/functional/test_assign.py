"""Assignment and cluster-mean helpers against the naive reference."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tokenprune.errors import ShapeError
from tokenprune.functional.assign import cluster_mean, nearest_assignment


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


@pytest.mark.parametrize("seed", range(3))
def test_nearest_assignment_and_cluster_mean_match_the_reference(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n, k = 14, 4
    x = torch.randn(3, n, 5, generator=g, dtype=torch.float64)
    keep = torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(3)])
    assignment = nearest_assignment(x, keep)
    merged, sizes = cluster_mean(x, assignment, k)
    torch.testing.assert_close(sizes.sum(dim=1), torch.full((3,), float(n), dtype=x.dtype))
    for row in range(3):
        want_assignment = ref.nearest_assignment(x[row], keep[row].tolist())
        assert assignment[row].tolist() == want_assignment
        want, want_sizes = ref.cluster_mean(x[row], want_assignment, k)
        torch.testing.assert_close(merged[row], want, atol=1e-6, rtol=0)
        torch.testing.assert_close(sizes[row], want_sizes)


def test_cluster_mean_weights_discarded_tokens_and_empty_slots() -> None:
    x = torch.tensor([[[1.0], [3.0], [100.0], [5.0]]])
    merged, total = cluster_mean(
        x, torch.tensor([[0, 0, -1, 2]]), 3, weights=torch.tensor([[1.0, 3.0, 1.0, 2.0]])
    )
    assert merged.flatten().tolist() == [2.5, 0.0, 5.0]
    assert total.flatten().tolist() == [4.0, 0.0, 2.0]


def test_cluster_mean_keeps_half_precision_dtype() -> None:
    x = torch.randn(1, 4, 2, dtype=torch.bfloat16)
    merged, total = cluster_mean(x, torch.tensor([[0, 1, 0, 1]]), 2)
    assert merged.dtype == total.dtype == torch.bfloat16


def test_errors() -> None:
    x = torch.randn(1, 4, 2)
    with pytest.raises(ShapeError):
        cluster_mean(x, torch.tensor([[0, 1, 2]]), 3)
    with pytest.raises(ShapeError):
        cluster_mean(x, torch.tensor([[0, 1, 2, 3]]), 3)
    with pytest.raises(ShapeError):
        cluster_mean(x, torch.tensor([[0, 0, 0, 0]]), 1, weights=torch.ones(1, 3))
    with pytest.raises(ShapeError):
        nearest_assignment(x, torch.tensor([[1, 1]]))
    with pytest.raises(ShapeError):
        nearest_assignment(x[0], torch.tensor([[1]]))
