"""Score normalisation and fusion against the naive reference."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tokenprune.errors import ShapeError
from tokenprune.functional.combine import combine_scores, normalize_scores


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

METHODS = ["rank", "zscore", "minmax"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ties", [False, True])
def test_normalize_matches_the_reference(method: str, ties: bool) -> None:
    g = torch.Generator().manual_seed(1)
    if ties:
        s = torch.randint(0, 4, (3, 11), generator=g).double()
    else:
        s = torch.randn(3, 11, generator=g, dtype=torch.float64) * 5
    got = normalize_scores(s, method)  # type: ignore[arg-type]
    assert got.dtype == torch.float64
    for row in range(3):
        want = torch.tensor(ref.normalize(s[row].tolist(), method), dtype=torch.float64)
        torch.testing.assert_close(got[row], want, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("method", "value"), [("rank", 0.5), ("zscore", 0.0), ("minmax", 0.0)])
def test_constant_and_single_token_rows_carry_no_ranking(method: str, value: float) -> None:
    constant = normalize_scores(torch.full((2, 5), 3.0), method)  # type: ignore[arg-type]
    assert constant.tolist() == [[value] * 5] * 2
    assert normalize_scores(torch.tensor([[4.0]]), method).tolist() == [[value]]  # type: ignore[arg-type]


def test_rank_is_invariant_to_monotone_rescaling() -> None:
    s = torch.rand(2, 9)
    torch.testing.assert_close(normalize_scores(s), normalize_scores(torch.exp(10 * s)))


@pytest.mark.parametrize("method", METHODS)
def test_combine_is_the_weighted_sum_of_normalised_maps(method: str) -> None:
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(2, 8, generator=g), torch.randn(2, 8, generator=g) * 100
    got = combine_scores([a, b], [0.7, 0.3], method=method)  # type: ignore[arg-type]
    for row in range(2):
        na = ref.normalize(a[row].tolist(), method)
        nb = ref.normalize(b[row].tolist(), method)
        want = torch.tensor([0.7 * x + 0.3 * y for x, y in zip(na, nb, strict=True)])
        torch.testing.assert_close(got[row], want, atol=1e-5, rtol=0)


def test_errors() -> None:
    with pytest.raises(ShapeError):
        normalize_scores(torch.rand(4))
    with pytest.raises(ShapeError):
        normalize_scores(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(ValueError, match="unknown normalization"):
        normalize_scores(torch.rand(1, 3), "softmax")  # type: ignore[arg-type]
    with pytest.raises(ShapeError):
        combine_scores([], [])
    with pytest.raises(ValueError, match="weights"):
        combine_scores([torch.rand(1, 3)], [1.0, 2.0])
    with pytest.raises(ShapeError):
        combine_scores([torch.rand(1, 3), torch.rand(1, 4)], [1.0, 1.0])
