from __future__ import annotations

import pytest
import torch

from tokenprune.errors import ShapeError
from tokenprune.functional import check_features, check_scores


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_check_scores_accepts_finite_float_maps(dtype: torch.dtype) -> None:
    assert check_scores(torch.zeros(2, 5, dtype=dtype), batch=2, num_tokens=5) is None


@pytest.mark.parametrize(
    ("scores", "match"),
    [
        (torch.zeros(2, 6), r"my scores must be \(B, N\) = \(2, 5\), got \(2, 6\)"),
        (torch.zeros(3, 5), r"my scores must be \(B, N\) = \(2, 5\), got \(3, 5\)"),
        (torch.zeros(10), r"got \(10,\)"),
        (torch.zeros(2, 5, 1), r"got \(2, 5, 1\)"),
        (torch.zeros(2, 5, dtype=torch.long), r"my scores must be a floating-point tensor.*int64"),
        (torch.zeros(2, 5, dtype=torch.bool), r"floating-point"),
    ],
)
def test_check_scores_rejects_wrong_shapes_and_dtypes(scores: torch.Tensor, match: str) -> None:
    with pytest.raises(ShapeError, match=match):
        check_scores(scores, batch=2, num_tokens=5, name="my scores")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_scores_rejects_non_finite_values_and_counts_them(bad: float) -> None:
    scores = torch.zeros(2, 5)
    scores[0, 1] = bad
    scores[1, 4] = bad
    with pytest.raises(ShapeError, match=r"scores contains 2 NaN/Inf values"):
        check_scores(scores, batch=2, num_tokens=5)


def test_check_features_accepts_finite_float_tokens() -> None:
    assert check_features(torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(0))) is None


@pytest.mark.parametrize(
    ("features", "match"),
    [
        (torch.zeros(4, 8), r"visual features must be \(B, N, D\), got \(4, 8\)"),
        (torch.zeros(1, 2, 4, 8), r"got \(1, 2, 4, 8\)"),
        (torch.zeros(1, 4, 8, dtype=torch.int32), r"floating-point tensor, got torch.int32"),
    ],
)
def test_check_features_rejects_wrong_shapes_and_dtypes(features: torch.Tensor, match: str) -> None:
    with pytest.raises(ShapeError, match=match):
        check_features(features, name="visual features")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_features_rejects_non_finite_values_with_a_hint(bad: float) -> None:
    features = torch.zeros(1, 4, 8)
    features[0, 2, 3] = bad
    with pytest.raises(ShapeError, match=r"NaN/Inf.*float16"):
        check_features(features)
