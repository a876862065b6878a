"""ToMe bipartite soft matching against the naive per-sample reference."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tokenprune.errors import BudgetError, ShapeError
from tokenprune.functional.assign import cluster_mean
from tokenprune.functional.tome import tome_partition, tome_round_sizes


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


def test_round_sizes() -> None:
    assert tome_round_sizes(576, 64) == [288, 144, 72, 8]
    assert tome_round_sizes(7, 7) == []
    assert tome_round_sizes(7, 1) == [3, 2, 1]
    assert tome_round_sizes(10, 6, r=3) == [3, 1]
    assert sum(tome_round_sizes(100, 13, r=5)) == 87
    with pytest.raises(BudgetError):
        tome_round_sizes(4, 0)
    with pytest.raises(BudgetError):
        tome_round_sizes(4, 2, r=0)


@pytest.mark.parametrize(("n", "k"), [(1, 1), (2, 1), (7, 3), (16, 8), (16, 16), (33, 5)])
@pytest.mark.parametrize("r", [None, 2])
def test_partition_matches_the_reference(n: int, k: int, r: int | None) -> None:
    g = torch.Generator().manual_seed(n * 13 + k)
    metric = torch.randn(3, n, 4, generator=g, dtype=torch.float64)
    keep_idx, assignment = tome_partition(metric, k, r=r)
    assert keep_idx.shape == (3, k)
    assert assignment.shape == (3, n)
    assert bool((keep_idx[:, 1:] > keep_idx[:, :-1]).all())
    for row in range(3):
        want_keep, want_assignment = ref.tome_partition(metric[row], k, r)
        assert keep_idx[row].tolist() == want_keep
        assert assignment[row].tolist() == want_assignment


@pytest.mark.parametrize(("n", "k"), [(9, 4), (24, 6)])
def test_groups_average_to_the_merged_tokens_and_keep_the_total_size(n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, n, 5, generator=g, dtype=torch.float64)
    keep_idx, assignment = tome_partition(x, k)
    merged, sizes = cluster_mean(x, assignment, k)
    torch.testing.assert_close(sizes.sum(dim=1), torch.full((2,), float(n), dtype=x.dtype))
    # Each representative belongs to its own group.
    assert torch.equal(assignment.gather(1, keep_idx), torch.arange(k).expand(2, k))
    for row in range(2):
        want, want_size = ref.cluster_mean(x[row], assignment[row].tolist(), k)
        torch.testing.assert_close(merged[row], want, atol=1e-6, rtol=0)
        torch.testing.assert_close(sizes[row], want_size)


def test_identical_pairs_merge_first() -> None:
    a, b = [1.0, 0.0], [0.0, 1.0]
    metric = torch.tensor([[a, a, b, b, [0.7, 0.7], [-0.7, 0.7]]])
    keep_idx, assignment = tome_partition(metric, 4)
    assert keep_idx.tolist() == [[1, 3, 4, 5]]
    assert assignment.tolist() == [[0, 0, 1, 1, 2, 3]]


def test_errors() -> None:
    with pytest.raises(ShapeError):
        tome_partition(torch.randn(4, 2), 2)
    with pytest.raises(BudgetError):
        tome_partition(torch.randn(1, 4, 2), 5)
