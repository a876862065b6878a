from __future__ import annotations

import pytest
import torch

from tokenprune.errors import ShapeError
from tokenprune.functional import gather_tokens, random_scores


def test_gather_tokens_matches_a_python_loop() -> None:
    g = torch.Generator().manual_seed(0)
    features = torch.randn(3, 10, 4, generator=g)
    indices = torch.tensor([[0, 4, 9], [1, 2, 3], [7, 8, 9]])
    out = gather_tokens(features, indices)
    expected = torch.stack(
        [torch.stack([features[b, int(i)] for i in row]) for b, row in enumerate(indices)]
    )
    assert out.shape == (3, 3, 4)
    assert torch.equal(out, expected)


def test_gather_tokens_keeps_dtype_and_allows_any_order() -> None:
    features = torch.arange(12, dtype=torch.float64).view(1, 4, 3)
    out = gather_tokens(features, torch.tensor([[3, 0]]))
    assert out.dtype == torch.float64
    assert out.tolist() == [[[9.0, 10.0, 11.0], [0.0, 1.0, 2.0]]]


def test_gather_tokens_with_no_indices_gives_no_tokens() -> None:
    out = gather_tokens(torch.zeros(2, 5, 3), torch.zeros(2, 0, dtype=torch.long))
    assert out.shape == (2, 0, 3)


@pytest.mark.parametrize(
    ("features", "indices", "match"),
    [
        (torch.zeros(2, 5), torch.zeros(2, 1, dtype=torch.long), r"features \(B, N, D\)"),
        (torch.zeros(2, 5, 3), torch.zeros(2, dtype=torch.long), r"indices \(B, K\)"),
        (torch.zeros(2, 5, 3), torch.zeros(3, 1, dtype=torch.long), r"same B.*\(3, 1\)"),
        (torch.zeros(2, 5, 3), torch.tensor([[0], [5]]), r"\[0, 5\)"),
        (torch.zeros(2, 5, 3), torch.tensor([[0], [-1]]), r"\[0, 5\)"),
    ],
)
def test_gather_tokens_errors(features: torch.Tensor, indices: torch.Tensor, match: str) -> None:
    with pytest.raises(ShapeError, match=match):
        gather_tokens(features, indices)


def test_random_scores_same_seed_same_scores() -> None:
    a = random_scores(2, 7, seed=3)
    b = random_scores(2, 7, seed=3)
    assert a.shape == (2, 7)
    assert a.dtype == torch.float32
    assert torch.equal(a, b)
    assert bool(((a >= 0) & (a < 1)).all())


def test_random_scores_different_seeds_differ() -> None:
    assert not torch.equal(random_scores(2, 7, seed=0), random_scores(2, 7, seed=1))


def test_random_scores_leaves_the_global_rng_untouched() -> None:
    before = torch.random.get_rng_state()
    random_scores(4, 100, seed=0)
    assert torch.equal(before, torch.random.get_rng_state())


def test_random_scores_does_not_depend_on_the_global_rng() -> None:
    torch.manual_seed(0)
    a = random_scores(2, 5, seed=9)
    torch.manual_seed(1)
    b = random_scores(2, 5, seed=9)
    assert torch.equal(a, b)


def test_random_scores_device_argument() -> None:
    assert random_scores(1, 3, seed=0, device="cpu").device == torch.device("cpu")
