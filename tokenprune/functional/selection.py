"""Budgets and order-preserving top-k keep indices."""

from __future__ import annotations

import math

import torch

from tokenprune.errors import BudgetError, ShapeError

__all__ = ["resolve_budget", "sorted_keep_indices", "topk_keep_indices"]


def resolve_budget(
    num_tokens: int, *, keep: int | None = None, keep_ratio: float | None = None
) -> int:
    """Turn a budget into a token count ``K`` for an image of ``num_tokens`` tokens.

    Exactly one of ``keep`` and ``keep_ratio`` must be given. A ratio is rounded half up,
    ``K = max(1, floor(keep_ratio * N + 0.5))``, so the ratios of the literature land on its
    counts: 0.111 of 576 gives 64, 0.222 gives 128, 0.333 gives 192, 0.056 gives 32.

    Args:
        num_tokens: Number of tokens per image ``N``.
        keep: Absolute number of tokens to keep, ``1 <= keep <= N``.
        keep_ratio: Fraction of tokens to keep, ``0 < keep_ratio <= 1``.

    Returns:
        The number of tokens to keep per image.

    Raises:
        BudgetError: If both or neither are given, or the value is out of range.

    Examples:
        >>> resolve_budget(576, keep_ratio=0.111)
        64
        >>> resolve_budget(144, keep=16)
        16
    """
    if num_tokens < 1:
        raise BudgetError(f"cannot prune an image with {num_tokens} tokens")
    if (keep is None) == (keep_ratio is None):
        raise BudgetError("give exactly one of `keep` (a count) and `keep_ratio` (a fraction)")
    if keep is not None:
        if isinstance(keep, bool) or not isinstance(keep, int):
            raise BudgetError(f"`keep` must be an int, got {keep!r}")
        if not 1 <= keep <= num_tokens:
            raise BudgetError(
                f"`keep`={keep} is out of range for N={num_tokens} tokens per image; "
                f"use 1 <= keep <= {num_tokens} or a `keep_ratio`"
            )
        return keep
    assert keep_ratio is not None
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, int | float):
        raise BudgetError(f"`keep_ratio` must be a number, got {keep_ratio!r}")
    if not (math.isfinite(keep_ratio) and 0.0 < keep_ratio <= 1.0):
        raise BudgetError(f"`keep_ratio`={keep_ratio} must be in (0, 1]")
    return max(1, math.floor(keep_ratio * num_tokens + 0.5))


def sorted_keep_indices(indices: torch.Tensor) -> torch.Tensor:
    """Sort keep indices ascending along the last dimension (restores raster order).

    Shape:
        - indices: :math:`(B, K)`
        - output: :math:`(B, K)`

    Examples:
        >>> sorted_keep_indices(torch.tensor([[3, 0, 2]]))
        tensor([[0, 2, 3]])
    """
    return indices.sort(dim=-1).values


def topk_keep_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores per row, in ascending (spatial) order.

    Ties are broken deterministically: among equal scores the lower index wins. NaN scores are
    rejected rather than silently ranked.

    Args:
        scores: Scores, higher is more worth keeping.
        k: Number of tokens to keep, ``1 <= k <= N``.

    Returns:
        Long tensor of kept indices, strictly increasing per row.

    Raises:
        ShapeError: If ``scores`` is not 2-D or contains NaN.
        BudgetError: If ``k`` is out of range.

    Shape:
        - scores: :math:`(B, N)`
        - output: :math:`(B, K)`

    Examples:
        >>> topk_keep_indices(torch.tensor([[0.1, 0.9, 0.5, 0.9]]), 2)
        tensor([[1, 3]])
        >>> topk_keep_indices(torch.zeros(1, 4), 2)
        tensor([[0, 1]])
    """
    if scores.ndim != 2:
        raise ShapeError(f"scores must be (B, N), got {tuple(scores.shape)}")
    n = scores.shape[1]
    if not 1 <= k <= n:
        raise BudgetError(f"k={k} is out of range for N={n} tokens; use 1 <= k <= {n}")
    if bool(torch.isnan(scores).any()):
        raise ShapeError("scores contain NaN; cannot rank tokens")
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return sorted_keep_indices(order[:, :k])
