r"""Score fusion: normalise several score maps per image and mix them with weights.

Score maps from different criteria live on different scales ([CLS] attention sums to one,
similarities lie in [-1, 1], norms are unbounded), so each map is first brought to a common
scale per image, then the maps are mixed linearly: ``0.7 * relevance + 0.3 * saliency``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from tokenprune.errors import ShapeError
from tokenprune.functional.assign import compute_dtype

__all__ = ["Normalization", "combine_scores", "normalize_scores"]

Normalization = Literal["rank", "zscore", "minmax"]
"""How :func:`normalize_scores` rescales each image's scores."""


def normalize_scores(scores: torch.Tensor, method: Normalization = "rank") -> torch.Tensor:
    r"""Rescale each row of ``scores`` so that maps from different scorers are comparable.

    - ``rank``: :math:`\hat s_i = \frac{\#\{j : s_j < s_i\} + (\#\{j : s_j = s_i\} - 1) / 2}{N
      - 1}`, the tie-averaged rank scaled to :math:`[0, 1]` (robust to outliers and to any
      monotone rescaling of a scorer);
    - ``zscore``: :math:`\hat s_i = (s_i - \mu) / \sigma` with the row's mean and population
      standard deviation;
    - ``minmax``: :math:`\hat s_i = (s_i - \min_j s_j) / (\max_j s_j - \min_j s_j)`.

    A constant row (or ``N = 1``) carries no ranking: ``rank`` makes it all 0.5 (every token
    ties for the middle), ``zscore`` and ``minmax`` all 0. The result is float32 (float64 for
    float64 input).

    Args:
        scores: Scores, higher is better.
        method: ``rank``, ``zscore`` or ``minmax``.

    Raises:
        ShapeError: If ``scores`` is not 2-D or not finite.
        ValueError: On an unknown method.

    Shape:
        - scores: :math:`(B, N)`
        - output: :math:`(B, N)`

    Examples:
        >>> s = torch.tensor([[3.0, 1.0, 1.0, 7.0]])
        >>> normalize_scores(s, "rank").tolist()
        [[0.6666666865348816, 0.1666666716337204, 0.1666666716337204, 1.0]]
        >>> normalize_scores(s, "minmax").tolist()
        [[0.3333333432674408, 0.0, 0.0, 1.0]]
    """
    if scores.ndim != 2:
        raise ShapeError(f"scores must be (B, N), got {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ShapeError("scores contain NaN/Inf; cannot normalise them")
    s = scores.to(compute_dtype(scores.dtype))
    n = s.shape[1]
    if method == "rank":
        if n < 2:
            return torch.full_like(s, 0.5)
        ordered = s.sort(dim=1).values
        below = torch.searchsorted(ordered, s, right=False)
        upto = torch.searchsorted(ordered, s, right=True)
        return (below + upto - 1).to(s.dtype) / (2.0 * (n - 1))
    if method == "zscore":
        centred = s - s.mean(dim=1, keepdim=True)
        std = centred.square().mean(dim=1, keepdim=True).sqrt()
        return torch.where(std > 0, centred / std.clamp_min(1e-30), 0.0)
    if method == "minmax":
        low = s.amin(dim=1, keepdim=True)
        span = s.amax(dim=1, keepdim=True) - low
        return torch.where(span > 0, (s - low) / span.clamp_min(1e-30), 0.0)
    raise ValueError(f"unknown normalization {method!r}; use 'rank', 'zscore' or 'minmax'")


def combine_scores(
    maps: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    method: Normalization = "rank",
) -> torch.Tensor:
    r"""Weighted sum of normalised score maps: :math:`s = \sum_m w_m \hat s^{(m)}`.

    Args:
        maps: Score maps, all of the same shape.
        weights: One weight per map (any real number; negative weights reward low scores).
        method: Per-map normalisation, see :func:`normalize_scores`.

    Raises:
        ShapeError: If no map is given or the shapes differ.
        ValueError: If the number of weights differs from the number of maps.

    Shape:
        - maps: each :math:`(B, N)`
        - output: :math:`(B, N)`

    Examples:
        >>> a = torch.tensor([[0.0, 1.0, 2.0]]); b = torch.tensor([[5.0, 0.0, 1.0]])
        >>> combine_scores([a, b], [0.5, 0.5], method="minmax").tolist()
        [[0.5, 0.25, 0.6000000238418579]]
    """
    if not maps:
        raise ShapeError("combine_scores needs at least one score map")
    if len(weights) != len(maps):
        raise ValueError(f"got {len(maps)} score maps but {len(weights)} weights")
    shape = tuple(maps[0].shape)
    for i, m in enumerate(maps):
        if tuple(m.shape) != shape:
            raise ShapeError(f"score map {i} has shape {tuple(m.shape)}, map 0 has {shape}")
    total = torch.zeros(shape, dtype=compute_dtype(maps[0].dtype), device=maps[0].device)
    for m, w in zip(maps, weights, strict=True):
        total = total + float(w) * normalize_scores(m, method).to(total.dtype)
    return total
