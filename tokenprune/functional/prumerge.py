r"""LLaVA-PruMerge and PruMerge+ (Shang et al., arXiv 2403.15388).

PruMerge keeps the tokens whose [CLS] attention is an outlier by the interquartile-range rule,
and lets each kept token absorb its most key-similar neighbours, weighted by their attention.
PruMerge+ adds spatially uniform tokens to the outliers.
"""

from __future__ import annotations

import math

import torch

from tokenprune.errors import BudgetError, ShapeError
from tokenprune.functional.assign import check_keep_indices, compute_dtype, cosine_similarity

__all__ = [
    "iqr_outliers",
    "prumerge_adaptive_count",
    "prumerge_keep_indices",
    "prumerge_merge",
]


def _check_scores(scores: torch.Tensor) -> None:
    if scores.ndim != 2:
        raise ShapeError(f"scores must be (B, N), got {tuple(scores.shape)}")
    if bool(torch.isnan(scores).any()):
        raise ShapeError("scores contain NaN; cannot rank tokens")


def iqr_outliers(scores: torch.Tensor) -> torch.Tensor:
    r"""Tokens whose score is an upper outlier by the interquartile-range rule, per image.

    .. math::
        a_i > Q_3 + 1.5\,(Q_3 - Q_1)

    with the quartiles of the image's scores by linear interpolation (NumPy's default, as in
    the official code; it pools the whole batch, here each image has its own quartiles).

    Shape:
        - scores: :math:`(B, N)`
        - output: :math:`(B, N)`, bool

    Examples:
        >>> iqr_outliers(torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.2, 9.0]])).tolist()
        [[False, False, False, False, False, True]]
    """
    _check_scores(scores)
    s = scores.to(compute_dtype(scores.dtype))
    quartiles = torch.quantile(s, torch.tensor([0.25, 0.75], dtype=s.dtype, device=s.device), dim=1)
    q1, q3 = quartiles[0], quartiles[1]
    return s > (q3 + 1.5 * (q3 - q1)).unsqueeze(1)


def _plus_uniform_mask(outliers: torch.Tensor) -> torch.Tensor:
    """The official PruMerge+ uniform indices, ``arange(0, N - 1, step)``, as a mask."""
    b, n = outliers.shape
    count = outliers.sum(dim=1).clamp_min(1)
    step = ((n // count) // 3).clamp_min(1)  # int(int(1 / ratio) / 3) with ratio = m / N
    index = torch.arange(n, device=outliers.device).expand(b, n)
    return (index % step.unsqueeze(1) == 0) & (index < n - 1)


def prumerge_adaptive_count(scores: torch.Tensor, *, plus: bool = False) -> torch.Tensor:
    r"""How many tokens the paper's adaptive rule keeps per image (no fixed budget).

    PruMerge keeps the :math:`m` IQR outliers (:func:`iqr_outliers`). PruMerge+ adds the
    uniformly spaced indices :math:`0, s, 2s, \dots < N - 1` of the official code, with
    :math:`s = \max(1, \lfloor \lfloor N / m \rfloor / 3 \rfloor)` (its ``int(step_length / 3)``
    with ``step_length = int(1 / ratio)``, ``ratio = m / N``), that are not outliers already.
    An image without outliers (the official code divides by zero) uses :math:`m = 1` for the
    stride.

    Shape:
        - scores: :math:`(B, N)`
        - output: :math:`(B,)`, long

    Examples:
        >>> s = torch.ones(1, 24); s[0, 5] = 50.0
        >>> prumerge_adaptive_count(s), prumerge_adaptive_count(s, plus=True)
        (tensor([1]), tensor([4]))
    """
    outliers = iqr_outliers(scores)
    count = outliers.sum(dim=1)
    if plus:
        count = count + (_plus_uniform_mask(outliers) & ~outliers).sum(dim=1)
    return count


def prumerge_keep_indices(scores: torch.Tensor, keep: int, *, plus: bool = False) -> torch.Tensor:
    r"""Exactly ``keep`` tokens per image, outliers first.

    - PruMerge: the outliers ranked by score, truncated to ``K`` or filled up to ``K`` with the
      next-highest scores. Under a fixed budget this is the top ``K`` by score (ties to the
      lower index); the outlier rule only sets the adaptive count
      (:func:`prumerge_adaptive_count`).
    - PruMerge+: the :math:`m' = \min(m, K)` highest-scoring outliers, then :math:`K - m'`
      spatially uniform tokens: with :math:`r_0 < r_1 < \dots` the :math:`N - m'` other
      tokens in raster order, the tokens :math:`r_{\lfloor i (N - m') / (K - m') \rfloor}` for
      :math:`i = 0 \dots K - m' - 1` (an even stride starting at the first token, as the
      official ``arange``).

    Args:
        scores: [CLS] attention.
        keep: Tokens per image ``K``.
        plus: PruMerge+ instead of PruMerge.

    Returns:
        Kept indices, strictly increasing per row.

    Raises:
        ShapeError: If ``scores`` is not 2-D or contains NaN.
        BudgetError: If ``keep`` is out of range.

    Shape:
        - scores: :math:`(B, N)`
        - output: :math:`(B, K)`, long

    Examples:
        >>> s = torch.ones(1, 12); s[0, 7] = 50.0
        >>> prumerge_keep_indices(s, 4, plus=True)
        tensor([[0, 3, 7, 8]])
    """
    _check_scores(scores)
    b, n = scores.shape
    if not 1 <= keep <= n:
        raise BudgetError(f"keep={keep} is out of range for N={n} tokens; use 1 <= keep <= {n}")
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    if not plus:
        return order[:, :keep].sort(dim=-1).values
    top = iqr_outliers(scores).sum(dim=1).clamp_max(keep)  # m' per image, (B,)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(n, device=scores.device).expand(b, n)
    )
    taken = rank < top.unsqueeze(1)  # the m' best outliers
    index = torch.arange(n, device=scores.device).expand(b, n)
    # The other tokens first, in raster order (a stable sort on the "taken" flag).
    others = torch.sort(taken.long() * n + index, dim=-1).values % n
    slot = torch.arange(keep, device=scores.device).expand(b, keep)
    fill = slot - top.unsqueeze(1)  # i = 0, 1, ... for the uniform slots
    spare = (keep - top).clamp_min(1).unsqueeze(1)
    position = torch.div(fill.clamp_min(0) * (n - top).unsqueeze(1), spare, rounding_mode="floor")
    uniform = others.gather(1, position.clamp_max(n - 1))
    chosen = torch.where(fill < 0, order[:, :keep], uniform)
    return chosen.sort(dim=-1).values


def prumerge_merge(
    features: torch.Tensor,
    keys: torch.Tensor,
    attention: torch.Tensor,
    keep_idx: torch.Tensor,
    *,
    neighbours: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Let each kept token absorb its ``k`` most key-similar tokens, weighted by attention.

    For kept token :math:`i`, :math:`\mathcal{N}_k(i)` are the :math:`k` other tokens (kept or
    not) with the highest :math:`\cos(\kappa_i, \kappa_j)` (ties to the lower index), and

    .. math::
        y_i = x_i + \sum_{j \in \mathcal{N}_k(i)} a_j x_j, \qquad w_i = 1 + \sum_{j \in
        \mathcal{N}_k(i)} a_j

    as in the official code (the neighbours use their original features; ``k`` is capped at
    ``N - 1``). A token may be a neighbour of several kept tokens, so the weights do not sum to
    ``N``: PruMerge is not a partition.

    Args:
        features: Token features.
        keys: Keys of the tokens (PruMerge: the full-width keys of the attention layer).
        attention: [CLS] attention of every token (the weights :math:`a_j`).
        keep_idx: Kept token indices, strictly increasing per row.
        neighbours: ``k``, the paper's 32.

    Returns:
        ``(merged, weights)``.

    Raises:
        ShapeError: If the shapes disagree or ``keep_idx`` is invalid.
        ValueError: If ``neighbours < 1``.

    Shape:
        - features: :math:`(B, N, D)`
        - keys: :math:`(B, N, C)`
        - attention: :math:`(B, N)`
        - keep_idx: :math:`(B, K)`
        - output: :math:`(B, K, D)` and :math:`(B, K)`

    Examples:
        >>> x = torch.tensor([[[1.0], [2.0], [4.0]]])
        >>> keys = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]])
        >>> a = torch.tensor([[0.5, 0.25, 0.25]])
        >>> merged, w = prumerge_merge(x, keys, a, torch.tensor([[0]]), neighbours=1)
        >>> merged.tolist(), w.tolist()
        ([[[1.5]]], [[1.25]])
    """
    if neighbours < 1:
        raise ValueError(f"neighbours must be at least 1, got {neighbours}")
    if features.ndim != 3 or keys.ndim != 3 or features.shape[:2] != keys.shape[:2]:
        raise ShapeError(
            f"features (B, N, D) and keys (B, N, C) must agree on (B, N), got "
            f"{tuple(features.shape)} and {tuple(keys.shape)}"
        )
    b, n, d = features.shape
    if tuple(attention.shape) != (b, n):
        raise ShapeError(f"attention must be (B, N) = {(b, n)}, got {tuple(attention.shape)}")
    check_keep_indices(keep_idx, batch=b, num_tokens=n)
    dtype = compute_dtype(features.dtype)
    x = features.to(dtype)
    kept_keys = keys.gather(1, keep_idx.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))
    sim = cosine_similarity(kept_keys, keys)  # (B, K, N)
    sim = sim.scatter(2, keep_idx.unsqueeze(-1), -math.inf)  # a token is not its own neighbour
    k = min(neighbours, n - 1)
    near = torch.sort(sim, dim=-1, descending=True, stable=True).indices[..., :k]  # (B, K, k)
    weight = attention.to(dtype).unsqueeze(1).expand(-1, keep_idx.shape[1], -1).gather(2, near)
    gathered = x.unsqueeze(1).expand(-1, keep_idx.shape[1], -1, -1)
    neighbour_x = gathered.gather(2, near.unsqueeze(-1).expand(-1, -1, -1, d))
    kept = x.gather(1, keep_idx.unsqueeze(-1).expand(-1, -1, d))
    merged = kept + (weight.unsqueeze(-1) * neighbour_x).sum(dim=2)
    return merged.to(features.dtype), (1.0 + weight.sum(dim=-1)).to(features.dtype)
