r"""VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467): dominant and contextual tokens.

*Dominant* tokens are the ones the [CLS] token attends to most. Of the remaining tokens, a few
spatially uniform *targets* become *contextual* tokens: every other remaining token is assigned
to the target whose key is most similar and folded into it.
"""

from __future__ import annotations

import math

import torch

from tokenprune.errors import BudgetError, ShapeError
from tokenprune.functional.assign import (
    check_keep_indices,
    cluster_mean,
    compute_dtype,
    cosine_similarity,
)

__all__ = ["visionzip_counts", "visionzip_keep_indices", "visionzip_merge"]


def visionzip_counts(keep: int, dominant_fraction: float) -> tuple[int, int]:
    r"""Split a budget of ``keep`` tokens into ``(dominant, contextual)``.

    .. math::
        D = \min\left(K, \left\lfloor K f + \tfrac12 \right\rfloor\right), \qquad C = K - D

    The paper's default ``f = 54/64`` gives its settings 54+10, 108+20 and 162+30 for ``K`` =
    64, 128 and 192.

    Args:
        keep: Tokens per image ``K``.
        dominant_fraction: Share ``f`` of dominant tokens, in ``[0, 1]``.

    Raises:
        BudgetError: If ``keep < 1`` or the fraction is outside ``[0, 1]``.

    Examples:
        >>> visionzip_counts(64, 54 / 64), visionzip_counts(192, 54 / 64)
        ((54, 10), (162, 30))
    """
    if keep < 1:
        raise BudgetError(f"keep must be at least 1, got {keep}")
    if not 0.0 <= dominant_fraction <= 1.0:
        raise BudgetError(f"dominant_fraction must be in [0, 1], got {dominant_fraction}")
    dominant = min(keep, math.floor(keep * dominant_fraction + 0.5))
    return dominant, keep - dominant


def visionzip_keep_indices(
    scores: torch.Tensor, keep: int, contextual: int
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The dominant tokens and the contextual targets of every image.

    The ``D = keep - contextual`` highest-scoring tokens are dominant (ties to the lower index).
    The other :math:`R = N - D` tokens, in raster order, give the ``C = contextual`` targets at
    the uniform stride of the official code: positions :math:`0, s, 2s, \dots` of that list with
    :math:`s = \max(1, \lfloor R / C \rfloor)`, the first ``C`` of them.

    Args:
        scores: [CLS] attention (any saliency, higher is more important).
        keep: Tokens per image ``K``.
        contextual: Number of contextual targets ``C``, ``0 <= C <= K``.

    Returns:
        ``(keep_idx, dominant)``: the kept indices, strictly increasing, and a mask that is
        ``True`` where the kept token is dominant and ``False`` where it is a contextual target.

    Raises:
        ShapeError: If ``scores`` is not 2-D or contains NaN.
        BudgetError: If ``keep`` or ``contextual`` is out of range.

    Shape:
        - scores: :math:`(B, N)`
        - output: :math:`(B, K)`, long, and :math:`(B, K)`, bool

    Examples:
        >>> s = torch.tensor([[0.0, 9.0, 0.0, 0.0, 8.0, 0.0, 0.0, 0.0]])
        >>> idx, dominant = visionzip_keep_indices(s, 4, 2)
        >>> idx.tolist(), dominant.tolist()
        ([[0, 1, 4, 5]], [[False, True, True, False]])
    """
    if scores.ndim != 2:
        raise ShapeError(f"scores must be (B, N), got {tuple(scores.shape)}")
    b, n = scores.shape
    if not 1 <= keep <= n:
        raise BudgetError(f"keep={keep} is out of range for N={n} tokens; use 1 <= keep <= {n}")
    if not 0 <= contextual <= keep:
        raise BudgetError(f"contextual={contextual} must lie in [0, keep={keep}]")
    if bool(torch.isnan(scores).any()):
        raise ShapeError("scores contain NaN; cannot rank tokens")
    dominant = keep - contextual
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    dominant_idx = order[:, :dominant]
    parts = [dominant_idx]
    if contextual:
        rest = order[:, dominant:].sort(dim=-1).values  # (B, R) in raster order
        step = max(1, rest.shape[1] // contextual)
        positions = torch.arange(0, rest.shape[1], step, device=scores.device)[:contextual]
        parts.append(rest[:, positions])
    idx = torch.cat(parts, dim=1)
    is_dominant = torch.arange(keep, device=scores.device) < dominant
    idx, perm = idx.sort(dim=-1)
    return idx, is_dominant.expand(b, keep).gather(1, perm)


def visionzip_merge(
    features: torch.Tensor,
    metric: torch.Tensor,
    keep_idx: torch.Tensor,
    dominant: torch.Tensor,
    *,
    mode: str = "add",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Fold every token that is not kept into its most similar contextual target.

    Each dropped token :math:`j` joins the target :math:`c(j) = \arg\max_c \cos(m_j, m_c)` over
    the kept tokens that are not dominant (ties to the lower index). With :math:`M_c` the
    members of target :math:`c`:

    - ``mode="add"`` (the official code): :math:`y_c = x_c + \frac{1}{|M_c|}\sum_{j \in M_c}
      x_j` (just :math:`x_c` when :math:`M_c` is empty);
    - ``mode="mean"``: :math:`y_c = \frac{1}{1 + |M_c|}\left(x_c + \sum_{j \in M_c} x_j\right)`.

    Dominant tokens are returned unchanged. The weight of a target is :math:`1 + |M_c|`, of a
    dominant token 1, so the weights sum to ``N`` whenever there is at least one target (with
    none, the dropped tokens are discarded, as with ``C = 0`` in the paper).

    Args:
        features: Token features (what is merged).
        metric: Per-token vectors for the similarity (VisionZip: the head-averaged keys).
        keep_idx: Kept token indices, strictly increasing per row.
        dominant: ``True`` for kept tokens that are dominant, ``False`` for contextual targets.
        mode: ``"add"`` or ``"mean"`` (see above).

    Returns:
        ``(merged, weights)``.

    Raises:
        ShapeError: If the shapes disagree or ``keep_idx`` is invalid.
        ValueError: On an unknown ``mode``.

    Shape:
        - features: :math:`(B, N, D)`
        - metric: :math:`(B, N, C)`
        - keep_idx, dominant: :math:`(B, K)`
        - output: :math:`(B, K, D)` and :math:`(B, K)`

    Examples:
        >>> x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 3.0], [2.0, 0.0]]])
        >>> merged, w = visionzip_merge(
        ...     x, x, torch.tensor([[0, 1]]), torch.tensor([[True, False]]))
        >>> merged[0, 1].tolist(), w.tolist()
        ([1.0, 2.5], [[1.0, 3.0]])
    """
    if mode not in ("add", "mean"):
        raise ValueError(f"mode must be 'add' or 'mean', got {mode!r}")
    if features.ndim != 3 or metric.ndim != 3 or features.shape[:2] != metric.shape[:2]:
        raise ShapeError(
            f"features (B, N, D) and metric (B, N, C) must agree on (B, N), got "
            f"{tuple(features.shape)} and {tuple(metric.shape)}"
        )
    b, n, _ = features.shape
    check_keep_indices(keep_idx, batch=b, num_tokens=n)
    if tuple(dominant.shape) != tuple(keep_idx.shape) or dominant.dtype != torch.bool:
        raise ShapeError(
            f"dominant must be a bool mask shaped like keep_idx {tuple(keep_idx.shape)}, got "
            f"{dominant.dtype} {tuple(dominant.shape)}"
        )
    k = keep_idx.shape[1]
    kept_metric = metric.gather(1, keep_idx.unsqueeze(-1).expand(-1, -1, metric.shape[-1]))
    sim = cosine_similarity(metric, kept_metric)  # (B, N, K)
    sim = sim.masked_fill(dominant.unsqueeze(1), -math.inf)
    assignment = sim.argmax(dim=-1)
    has_target = (~dominant).any(dim=1, keepdim=True)
    is_kept = torch.zeros(b, n, dtype=torch.bool, device=features.device)
    is_kept.scatter_(1, keep_idx, True)
    assignment = torch.where(has_target & ~is_kept, assignment, -1)
    members_mean, members = cluster_mean(features, assignment, k)
    dtype = compute_dtype(features.dtype)
    kept = features.gather(1, keep_idx.unsqueeze(-1).expand(-1, -1, features.shape[-1])).to(dtype)
    count = members.to(dtype).unsqueeze(-1)
    mean = members_mean.to(dtype)
    merged = kept + mean if mode == "add" else (kept + mean * count) / (1.0 + count)
    return merged.to(features.dtype), (1.0 + members.to(dtype)).to(features.dtype)
