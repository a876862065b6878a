from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenprune.errors import BudgetError, ShapeError
from tokenprune.functional import resolve_budget, sorted_keep_indices, topk_keep_indices

# -- resolve_budget ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_tokens", "ratio", "expected"),
    [
        # The ratios of the literature land on its counts (LLaVA-1.5: 576 tokens per image).
        (576, 0.111, 64),
        (576, 0.222, 128),
        (576, 0.333, 192),
        (576, 0.056, 32),
        (144, 0.333, 48),
        (144, 0.222, 32),
        (144, 0.111, 16),
        (144, 0.056, 8),
        (576, 1.0, 576),
        (576, 1, 576),
        # Half up: 2.5 -> 3, 7.5 -> 8; never below one token.
        (5, 0.5, 3),
        (15, 0.5, 8),
        (10, 0.001, 1),
        (1, 0.01, 1),
    ],
)
def test_resolve_budget_ratio_rounds_half_up(num_tokens: int, ratio: float, expected: int) -> None:
    assert resolve_budget(num_tokens, keep_ratio=ratio) == expected


@given(n=st.integers(1, 5000), ratio=st.floats(1e-6, 1.0))
@settings(max_examples=200, deadline=None)
def test_resolve_budget_ratio_matches_the_documented_formula(n: int, ratio: float) -> None:
    k = resolve_budget(n, keep_ratio=ratio)
    assert k == max(1, math.floor(ratio * n + 0.5))
    assert 1 <= k <= n


@pytest.mark.parametrize("keep", [1, 64, 576])
def test_resolve_budget_count_is_returned_as_is(keep: int) -> None:
    assert resolve_budget(576, keep=keep) == keep


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keep": 0}, r"`keep`=0 is out of range for N=576"),
        ({"keep": -3}, r"out of range"),
        ({"keep": 577}, r"`keep`=577 is out of range for N=576.*1 <= keep <= 576"),
        ({"keep": True}, r"`keep` must be an int, got True"),
        ({"keep": False}, r"`keep` must be an int, got False"),
        ({"keep": 64.0}, r"`keep` must be an int"),
        ({"keep_ratio": 0.0}, r"`keep_ratio`=0.0 must be in \(0, 1\]"),
        ({"keep_ratio": -0.5}, r"must be in \(0, 1\]"),
        ({"keep_ratio": 1.5}, r"`keep_ratio`=1.5 must be in \(0, 1\]"),
        ({"keep_ratio": float("nan")}, r"`keep_ratio`=nan must be in \(0, 1\]"),
        ({"keep_ratio": float("inf")}, r"must be in \(0, 1\]"),
        ({"keep_ratio": True}, r"`keep_ratio` must be a number, got True"),
        ({"keep_ratio": "0.5"}, r"`keep_ratio` must be a number"),
        ({}, r"exactly one of `keep`.*`keep_ratio`"),
        ({"keep": 64, "keep_ratio": 0.5}, r"exactly one of `keep`.*`keep_ratio`"),
    ],
)
def test_resolve_budget_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(BudgetError, match=match):
        resolve_budget(576, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_tokens", [0, -1])
def test_resolve_budget_rejects_empty_images(num_tokens: int) -> None:
    with pytest.raises(BudgetError, match=f"{num_tokens} tokens"):
        resolve_budget(num_tokens, keep=1)


def test_budget_error_is_a_config_error_and_a_value_error() -> None:
    from tokenprune.errors import ConfigError, TokenPruneError

    with pytest.raises(BudgetError) as info:
        resolve_budget(4, keep=9)
    assert isinstance(info.value, ConfigError)
    assert isinstance(info.value, TokenPruneError)
    assert isinstance(info.value, ValueError)


# -- topk_keep_indices -------------------------------------------------------------------------


def reference_topk(scores: torch.Tensor, k: int) -> list[list[int]]:
    """Naive reference: rank with Python sort keys (higher score first, then lower index)."""
    out = []
    for row in scores.tolist():
        ranked = sorted(range(len(row)), key=lambda i: (-row[i], i))
        out.append(sorted(ranked[:k]))
    return out


@st.composite
def scores_and_k(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    batch = draw(st.integers(1, 3))
    n = draw(st.integers(1, 24))
    k = draw(st.integers(1, n))
    # Few distinct values (many ties), or arbitrary finite floats (infinities included).
    values = draw(
        st.one_of(
            st.sampled_from([[0.0, 1.0], [0.0, 0.5, 1.0, -2.0], [3.0]]).flatmap(
                lambda pool: st.lists(st.sampled_from(pool), min_size=batch * n, max_size=batch * n)
            ),
            st.lists(
                st.floats(allow_nan=False, width=32),
                min_size=batch * n,
                max_size=batch * n,
            ),
        )
    )
    return torch.tensor(values, dtype=torch.float32).view(batch, n), k


@given(case=scores_and_k())
@settings(max_examples=150, deadline=None)
def test_topk_keep_indices_matches_the_naive_reference(case: tuple[torch.Tensor, int]) -> None:
    scores, k = case
    out = topk_keep_indices(scores, k)
    assert out.dtype == torch.long
    assert tuple(out.shape) == (scores.shape[0], k)
    assert out.tolist() == reference_topk(scores, k)


def test_topk_keep_indices_ties_go_to_the_lower_index() -> None:
    assert topk_keep_indices(torch.zeros(2, 6), 3).tolist() == [[0, 1, 2], [0, 1, 2]]
    scores = torch.tensor([[1.0, 2.0, 2.0, 1.0, 2.0]])
    assert topk_keep_indices(scores, 2).tolist() == [[1, 2]]
    assert topk_keep_indices(scores, 4).tolist() == [[0, 1, 2, 4]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_keep_indices_separates_scores_1e6_apart(dtype: torch.dtype) -> None:
    # A difference of 1e-6 is a real difference, not a tie: the larger score wins over a
    # lower index, in both float32 and float64.
    scores = torch.tensor([[0.5, 0.5 + 1e-6, 0.5, 0.5 + 2e-6]], dtype=dtype)
    assert topk_keep_indices(scores, 1).tolist() == [[3]]
    assert topk_keep_indices(scores, 2).tolist() == [[1, 3]]
    assert topk_keep_indices(scores, 3).tolist() == [[0, 1, 3]]


def test_topk_keep_indices_is_strictly_increasing_per_row() -> None:
    g = torch.Generator().manual_seed(0)
    out = topk_keep_indices(torch.rand(4, 50, generator=g), 17)
    assert bool((out[:, 1:] > out[:, :-1]).all())


def test_topk_keep_indices_full_budget_keeps_everything() -> None:
    g = torch.Generator().manual_seed(1)
    out = topk_keep_indices(torch.randn(2, 9, generator=g), 9)
    assert out.tolist() == [list(range(9))] * 2


@pytest.mark.parametrize(
    ("scores", "k", "error", "match"),
    [
        (torch.zeros(5), 1, ShapeError, r"scores must be \(B, N\), got \(5,\)"),
        (torch.zeros(1, 2, 3), 1, ShapeError, r"scores must be \(B, N\)"),
        (torch.zeros(2, 5), 0, BudgetError, r"k=0 is out of range for N=5"),
        (torch.zeros(2, 5), 6, BudgetError, r"k=6 is out of range for N=5"),
        (torch.tensor([[0.1, float("nan"), 0.3]]), 1, ShapeError, r"NaN"),
    ],
)
def test_topk_keep_indices_errors(
    scores: torch.Tensor, k: int, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        topk_keep_indices(scores, k)


def test_sorted_keep_indices_sorts_each_row() -> None:
    idx = torch.tensor([[5, 1, 3], [0, 9, 2]])
    assert sorted_keep_indices(idx).tolist() == [[1, 3, 5], [0, 2, 9]]
