from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from tokenprune.errors import ShapeError, TokenPruneError
from tokenprune.types import PrunedTokens, Selection, TextTokens, VisualTokens

# -- VisualTokens ------------------------------------------------------------------------------


def test_visual_tokens_properties() -> None:
    visual = VisualTokens(torch.zeros(2, 6, 4), grid=(2, 3))
    assert (visual.batch_size, visual.num_tokens, visual.grid) == (2, 6, (2, 3))
    assert VisualTokens(torch.zeros(1, 5, 4)).grid is None


@pytest.mark.parametrize("shape", [(6, 4), (2, 6), (1, 2, 6, 4)])
def test_visual_tokens_need_three_dimensions(shape: tuple[int, ...]) -> None:
    with pytest.raises(ShapeError, match=re.escape(f"must be (B, N, D), got shape {shape}")):
        VisualTokens(torch.zeros(shape))


def test_visual_tokens_grid_must_match_the_token_count() -> None:
    with pytest.raises(ShapeError, match=r"grid \(2, 2\) has 4 cells but features hold N=6"):
        VisualTokens(torch.zeros(1, 6, 4), grid=(2, 2))


def test_visual_tokens_are_frozen() -> None:
    visual = VisualTokens(torch.zeros(1, 4, 2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        visual.grid = (2, 2)  # type: ignore[misc]


# -- TextTokens --------------------------------------------------------------------------------


def test_text_tokens_with_texts_only_or_embeddings_and_mask() -> None:
    assert TextTokens(texts=("a?",)).embeddings is None
    text = TextTokens(
        texts=("a?", "b?"), embeddings=torch.zeros(2, 3, 4), mask=torch.ones(2, 3, dtype=torch.bool)
    )
    assert text.mask is not None
    assert text.mask.shape == (2, 3)
    assert TextTokens().texts is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"embeddings": torch.zeros(1, 3, 4)}, r"embeddings and TextTokens.mask go together"),
        ({"mask": torch.ones(1, 3, dtype=torch.bool)}, r"go together"),
        (
            {"embeddings": torch.zeros(1, 3, 4), "mask": torch.ones(1, 3)},
            r"mask must be a bool tensor of shape \(B, T\) = \(1, 3\), got torch.float32",
        ),
        (
            {"embeddings": torch.zeros(1, 3, 4), "mask": torch.ones(1, 4, dtype=torch.bool)},
            r"got torch.bool \(1, 4\)",
        ),
        (
            {
                "texts": ("a?", "b?"),
                "embeddings": torch.zeros(1, 3, 4),
                "mask": torch.ones(1, 3, dtype=torch.bool),
            },
            r"texts has 2 strings for a batch of 1",
        ),
    ],
)
def test_text_tokens_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ShapeError, match=match):
        TextTokens(**kwargs)  # type: ignore[arg-type]


# -- Selection ---------------------------------------------------------------------------------


def test_selection_mask_and_count() -> None:
    selection = Selection(torch.tensor([[0, 2], [1, 3]]))
    assert selection.num_kept == 2
    assert selection.mask(4).tolist() == [[True, False, True, False], [False, True, False, True]]


def test_selection_allows_one_or_no_token() -> None:
    assert Selection(torch.tensor([[5]])).num_kept == 1
    assert Selection(torch.zeros(2, 0, dtype=torch.long)).num_kept == 0


@pytest.mark.parametrize(
    ("idx", "match"),
    [
        (torch.tensor([0, 1]), r"\(B, K\) long tensor, got torch.int64 \(2,\)"),
        (torch.tensor([[0, 1]], dtype=torch.int32), r"got torch.int32 \(1, 2\)"),
        (torch.tensor([[0.0, 1.0]]), r"got torch.float32"),
        (torch.tensor([[2, 1]]), r"strictly increasing per row.*sorted_keep_indices"),
        (torch.tensor([[0, 1], [1, 1]]), r"strictly increasing per row \(sorted, no duplicates\)"),
    ],
)
def test_selection_validation(idx: torch.Tensor, match: str) -> None:
    with pytest.raises(ShapeError, match=match):
        Selection(idx)


# -- PrunedTokens ------------------------------------------------------------------------------


def test_pruned_tokens_count() -> None:
    pruned = PrunedTokens(
        torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3)
    )
    assert pruned.num_kept == 3


@pytest.mark.parametrize(
    ("features", "weights", "match"),
    [
        (
            torch.zeros(2, 4, 4),
            torch.ones(2, 3),
            r"features must be \(B, K, D\) with \(B, K\) = \(2, 3\), got \(2, 4, 4\)",
        ),
        (torch.zeros(1, 3, 4), torch.ones(2, 3), r"got \(1, 3, 4\)"),
        (torch.zeros(2, 3), torch.ones(2, 3), r"got \(2, 3\)"),
        (
            torch.zeros(2, 3, 4),
            torch.ones(2, 4),
            r"weights must be \(B, K\) = \(2, 3\), got \(2, 4\)",
        ),
        (torch.zeros(2, 3, 4), torch.ones(3), r"weights must be \(B, K\)"),
    ],
)
def test_pruned_tokens_validation(
    features: torch.Tensor, weights: torch.Tensor, match: str
) -> None:
    with pytest.raises(ShapeError, match=match):
        PrunedTokens(features, torch.zeros(2, 3, dtype=torch.long), weights)


def test_shape_errors_are_tokenprune_and_value_errors() -> None:
    with pytest.raises(TokenPruneError):
        Selection(torch.tensor([1]))
    with pytest.raises(ValueError, match="long tensor"):
        Selection(torch.tensor([1]))
